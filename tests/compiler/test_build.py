"""CUDA artifacts are built here (no GPU) with nvcc into real fatbins for the asked architecture."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from reference_models import build, example_inputs

import tensorpress
from tensorpress.compiler.cuda.toolchain import extract_fatbins
from tensorpress.runtime.artifact import LIBRARY, open_artifact
from tensorpress.schedules.verification.cuda_inspection import find_tool


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


def test_a_cuda_compile_never_imports_tvms_tensor_intrin_package(tmp_path):
    """`tvm.s_tir.tensor_intrin` takes ~40 s to import; the Tensor Core path registers its own intrinsics."""
    import sys

    code = (
        "import sys, torch, tensorpress\n"
        f"sys.path.append({str(Path(__file__).resolve().parents[1])!r})\n"  # reference_models, after tensorpress
        "from reference_models import build, example_inputs\n"
        f"tensorpress.compile(build('mlp'), {str(tmp_path / 'm.tpk')!r}, example_inputs=example_inputs('mlp'),"
        " target='cuda:sm_90a', dtype='float16')\n"
        "print(sorted(m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "m.tpk").exists()
