"""Tile parameters: their rules, the search space, the untuned choice."""

from __future__ import annotations

import pytest

from tensorpress.errors import ConfigError, ShapeError
from tensorpress.schedules.tensorcore.arch import arch_spec
from tensorpress.schedules.tensorcore.tile_config import (
    SHIPPED_TILES,
    TileConfig,
    check_weight_shape,
    choose_config,
    search_space,
    token_tile,
)

H100, A100 = arch_spec("sm_90a"), arch_spec("sm_80")
LLM_LAYERS = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (36864, 9216)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_m": 40}, "multiple of 16"),
        ({"block_k": 48}, "block_k=48"),
        ({"block_n": 128}, "at most 64 tokens"),
        ({"warps": 3}, "split into warps=3"),
        ({"stages": 1}, "at least 2 stages"),
        ({"block_n": 64, "block_m": 256, "warps": 1}, "accumulator registers"),
        ({"block_m": 256, "block_k": 256, "warps": 8, "stages": 5}, "shared memory"),
        ({"split_k": 0}, "positive integer"),
    ],
)
def test_invalid_configs_name_the_broken_rule(change, message):
    with pytest.raises(ConfigError, match=message):
        TileConfig(**{**TileConfig().to_dict(), **change}).validate(H100)


def test_shared_memory_bound_depends_on_the_arch():
    big = TileConfig(block_n=64, block_m=256, block_k=64, warps=8, stages=3)
    assert 166912 < big.shared_bytes() <= 232448
    big.validate(H100)
    with pytest.raises(ConfigError, match="sm_80"):
        big.validate(A100)


def test_shipped_tiles_are_valid_everywhere_they_ship():
    for tile in SHIPPED_TILES:
        tile.validate(A100)
        tile.validate(H100)


@pytest.mark.parametrize("m, k", LLM_LAYERS)
def test_search_space_is_small_valid_and_covers_every_token_tile(m, k):
    space = search_space(m, k, H100)
    assert 50 < len(space) < 5000
    assert {c.block_n for c in space} == {16, 32, 64}
    for config in space[:: max(1, len(space) // 50)]:
        config.validate(H100)
        config.check_shape(m, k)
        assert config.padded_k(k) <= 1.03 * k


@pytest.mark.parametrize("arch", [A100, H100], ids=["sm_80", "sm_90a"])
@pytest.mark.parametrize("m, k", LLM_LAYERS)
@pytest.mark.parametrize("n", [1, 16, 32, 64, 128])
def test_untuned_choice_is_a_shipped_tile_that_fills_the_gpu(arch, m, k, n):
    config = choose_config(m, k, arch, n)
    tile = TileConfig(**{**config.to_dict(), "split_k": 1})
    assert tile in SHIPPED_TILES and config.block_n == token_tile(n)
    config.check_shape(m, k)
    ctas = m // config.block_m * config.split_k * -(-n // config.block_n)
    assert ctas >= arch.sm_count * 0.9  # at least (nearly) one CTA per SM for the weight stream


def test_every_multiple_of_16_gets_a_config_and_others_a_shape_error():
    for m, k in [(16, 16), (48, 80), (4112, 4096), (128, 64)]:
        config = choose_config(m, k, H100)
        config.validate(H100)
        config.check_shape(m, k)
    with pytest.raises(ShapeError, match="multiple of block_m=128"):
        TileConfig(block_m=128).check_shape(4112, 4096)
    for m, k in [(8, 64), (64, 24), (0, 64)]:
        with pytest.raises(ShapeError, match="multiples of 16"):
            check_weight_shape(m, k)


def test_labels_are_unique_and_stable():
    labels = {c.label() for c in search_space(4096, 4096, H100)}
    assert len(labels) == len(search_space(4096, 4096, H100))
    assert TileConfig().label() == "n16m128k64w4s4sk1"
