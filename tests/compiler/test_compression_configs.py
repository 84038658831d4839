"""User configs: defaults, validation with ConfigError, dict/JSON round trips, the lazy top-level export."""

from __future__ import annotations

import json

import pytest

import tensorpress
from tensorpress.compiler.compression_configs import FPxConfig, KVCacheConfig, SparseConfig, config_from_dict
from tensorpress.compiler.formats.fpx import FPxFormat
from tensorpress.errors import ConfigError


def test_defaults_and_lazy_export():
    assert tensorpress.FPxConfig is FPxConfig
    assert tensorpress.SparseConfig is SparseConfig and tensorpress.KVCacheConfig is KVCacheConfig
    config = FPxConfig()
    assert (config.ebits, config.mbits, config.scale_search, config.skip) == (3, 2, "absmax", ())
    assert config.format_name == "e3m2"
    assert FPxConfig(2, 3).format_name == "e2m3"
    assert (SparseConfig(0.8).format, SparseConfig(0.8).prune) == ("auto", "magnitude")
    assert KVCacheConfig().format == "auto"
    assert FPxConfig.implemented and SparseConfig.implemented and KVCacheConfig.implemented


@pytest.mark.parametrize(
    "config",
    [
        FPxConfig(),
        FPxConfig(2, 3, "mse", ("*.attention.*", "encoder.layer.0.*")),
        SparseConfig(0.8, "bitmap"),
        SparseConfig(0.5, "tiled-csl", "wanda"),
        SparseConfig(0),
        KVCacheConfig("int8"),
        KVCacheConfig("int2-kitty", boost_fraction=0.125, sink=32, window=128),
    ],
)
def test_round_trips_through_dict_and_json(config):
    data = config.to_dict()
    assert data["kind"] == type(config).kind
    assert config_from_dict(json.loads(json.dumps(data))) == config
    assert type(config).from_dict(data) == config


def test_skip_takes_any_sequence_and_stays_hashable():
    config = FPxConfig(skip=["a.*", "b"])
    assert config.skip == ("a.*", "b")
    assert hash(config) == hash(FPxConfig(skip=("a.*", "b")))


@pytest.mark.parametrize(
    "build",
    [
        lambda: FPxConfig(0, 2),
        lambda: FPxConfig(5, 2),
        lambda: FPxConfig(3, -1),
        lambda: FPxConfig(4, 4),
        lambda: FPxConfig(3.0, 2),
        lambda: FPxConfig(True, 2),
        lambda: FPxConfig(scale_search="percentile"),
        lambda: FPxConfig(skip="layer.0"),
        lambda: FPxConfig(skip=[3]),
        lambda: SparseConfig(1.0),
        lambda: SparseConfig(-0.1),
        lambda: SparseConfig("0.5"),
        lambda: SparseConfig(0.5, "csr"),
        lambda: SparseConfig(0.5, prune="random"),
        lambda: KVCacheConfig("int3"),
        lambda: KVCacheConfig("int2-kitty", boost_fraction=0.3),
        lambda: KVCacheConfig("int2-kitty", window=-1),
        lambda: KVCacheConfig("int8", sink=32),  # options of page-granular formats only
    ],
)
def test_bad_values_raise_config_errors(build):
    with pytest.raises(ConfigError):
        build()


def test_bad_dicts_raise_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        FPxConfig.from_dict({"kind": "fpx", "bits": 6})
    with pytest.raises(ConfigError, match="sparse"):
        FPxConfig.from_dict({"kind": "sparse", "sparsity": 0.5})
    with pytest.raises(ConfigError, match="kind"):
        config_from_dict({"kind": "int8"})


def test_fpx_config_maps_to_registry_formats():
    assert FPxConfig(2, 2, "mse").weight_format() == FPxFormat("e2m2", 2, 2, "mse")
    assert FPxConfig.from_format_name("fp6") == FPxConfig(3, 2)
    assert FPxConfig.from_format_name("fp4", "mse", ["x"]) == FPxConfig(2, 1, "mse", ("x",))
    assert FPxConfig.from_format_name("e3m1") == FPxConfig(3, 1)
    for name in ["dense-fp16", "fp6-auto", "fp7"]:
        with pytest.raises(ConfigError):
            FPxConfig.from_format_name(name)
