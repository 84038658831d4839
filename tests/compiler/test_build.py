"""CUDA artifacts are built here (no GPU) with nvcc into real fatbins for the asked architecture."""

from __future__ import annotations

import subprocess

import pytest
from reference_models import build, example_inputs

import tensorpress
from tensorpress.compiler.cuda.toolchain import extract_fatbins
from tensorpress.runtime.artifact import LIBRARY, open_artifact
from tensorpress.schedules.tensorcore.inspection import find_tool


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_transformer_block_builds_a_fatbin_for_the_asked_arch(arch, tmp_path):
    report = tensorpress.compile(
        build("block"), tmp_path / "block.tpk", example_inputs=example_inputs("block"), target=f"cuda:{arch}"
    )
    manifest = report.manifest
    assert manifest["target"] == {"kind": "cuda", "arch": arch}
    assert {layer["format"] for layer in manifest["layers"]} == {"dense-fp16"}
    library = tmp_path / "library.so"
    library.write_bytes(open_artifact(report.artifact).read_member(LIBRARY))
    fatbins = extract_fatbins(library)
    assert fatbins, "the CUDA library carries no fatbin (only CUDA source?)"
    fatbin = tmp_path / "kernels.fatbin"
    fatbin.write_bytes(max(fatbins, key=len))
    cuobjdump = find_tool("cuobjdump")
    elf = subprocess.run([cuobjdump, "-lelf", str(fatbin)], capture_output=True, text=True, check=True).stdout
    assert f".{arch}.cubin" in elf and all(f".{arch}." in line for line in elf.splitlines() if "cubin" in line)
    sass = subprocess.run([cuobjdump, "-sass", str(fatbin)], capture_output=True, text=True, check=True).stdout
    kernels = [line.split(":", 1)[1].strip() for line in sass.splitlines() if "Function :" in line]
    assert any("weight_gemm" in k for k in kernels), kernels
    assert any("layer_norm" in k for k in kernels), kernels
    assert any("softmax" in k for k in kernels), kernels
