"""`tensorpress compile --target cuda:sm_90a --weights fp6` on the bundled tiny Llama: every FPx linear
layer's weight-GEMM kernel in the artifact runs on Tensor Cores (HMMA, LDSM, LDGSTS in its SASS)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import tensorpress
from tensorpress.compiler.cuda.toolchain import extract_fatbins
from tensorpress.runtime.artifact import LIBRARY, open_artifact
from tensorpress.schedules.verification.cuda_inspection import find_tool, parse_sass

TINY_LLAMA = Path(__file__).resolve().parents[3] / "examples" / "tiny_llama"


def test_tiny_llama_fp6_for_sm_90a_runs_its_fpx_layers_on_tensor_cores(tmp_path):
    report = tensorpress.compile(TINY_LLAMA, tmp_path / "tiny.tpk", target="cuda:sm_90a", weights="fp6")
    layers = report.manifest["layers"]
    fpx_shapes = {tuple(layer["shape"]) for layer in layers if layer["stored_format"] == "e3m2"}
    assert fpx_shapes and all(layer["stored_format"] in ("e3m2", "dense-fp16") for layer in layers)

    library = tmp_path / "library.so"
    library.write_bytes(open_artifact(report.artifact).read_member(LIBRARY))
    fatbin = tmp_path / "kernels.fatbin"
    fatbin.write_bytes(max(extract_fatbins(library), key=len))
    listing = subprocess.run([find_tool("cuobjdump"), "-sass", str(fatbin)], capture_output=True, text=True, check=True)
    kernels = parse_sass(listing.stdout)
    fpx = {name: ops for name, ops in kernels.items() if "weight_gemm_e3m2" in name and ops["HMMA"]}
    # one main kernel per FPx layer shape and token tile, each on the Tensor Core path, the planes by cp.async
    for m, k in fpx_shapes:
        assert any(f"_{m}x{k}_" in name for name in fpx), (m, k, sorted(kernels))
    for name, ops in fpx.items():
        assert ops["LDSM"] > 0 and ops["LDGSTS"] > 0 and ops["LDL"] == ops["STL"] == 0, (name, dict(ops))
