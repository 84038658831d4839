"""Our safetensors reader against the safetensors library's writer, bf16 included, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tensorpress.errors import ModelImportError
from tensorpress.frontend.decoders.safetensors_reader import read_safetensors_folder


def test_reads_every_dtype_a_checkpoint_uses_across_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    first = {
        "a.f32": torch.randn(3, 5, generator=g),
        "a.f16": torch.randn(4, generator=g).half(),
        "a.bf16": torch.randn(2, 3, generator=g).bfloat16(),
    }
    second = {"b.i64": torch.arange(6).reshape(2, 3), "b.bool": torch.tensor([True, False])}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    arrays = read_safetensors_folder(tmp_path)
    assert set(arrays) == set(first) | set(second)
    for name, tensor in {**first, **second}.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        np.testing.assert_array_equal(arrays[name], expected)
        assert arrays[name].dtype == expected.dtype


def test_a_corrupt_file_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelImportError, match="model.safetensors"):
        read_safetensors_folder(tmp_path)


@pytest.mark.parametrize(
    "header, match",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "declares shape"),  # 2 floats in 4 bytes
        ([1, 2, 3], "not a JSON object"),
        ({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, "dtype F8_E4M3"),
    ],
)
def test_a_header_that_does_not_describe_its_data_is_named(tmp_path, header, match):
    import json
    import struct

    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(ModelImportError, match=match):
        read_safetensors_folder(tmp_path)
