"""`tensorpress compile / inspect` as a user meets them, in subprocesses: bad destinations and shapes are one
sentence before any work, nothing is left on disk, the same input gives the same bytes in two processes,
output cut short by its reader ends quietly, and a compile prints its own stage lines and nothing of TVM's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tensorpress

TVM_LOG_LINE = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")  # how TVM's C++ LOG(...) lines begin
STAGE_LINES = ("importing ", "packing the weights of ", "building the kernels for ", "writing ")


def tp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tensorpress", *args], capture_output=True, text=True, timeout=600, env=env
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failed command's stderr: exactly one line, `error: <one sentence>.`, and exit status 1."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith("."), line
    assert not re.search(r"[.!?]\s+[A-Z]", line), line
    return line


@pytest.fixture(scope="module")
def embedding_onnx(tmp_path_factory) -> Path:
    """y[1, 8, 128] = table[ids] @ w: a Gather (which TVM legalises with a warning of its own) and a linear."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((50, 64)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
            helper.make_node("MatMul", ["h", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 128])],
        [table, w],
    )
    path = tmp_path_factory.mktemp("model") / "embed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_compile_prints_its_stages_and_no_tvm_log_lines(embedding_onnx, tmp_path):
    result = tp("compile", str(embedding_onnx), "-o", str(tmp_path / "m.tpk"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if TVM_LOG_LINE.match(line)], result.stderr
    assert [line for line in lines if not line.startswith(STAGE_LINES)] == [], result.stderr
    assert [line.split(" ")[0] for line in lines] == ["importing", "packing", "building", "writing"]
    assert result.stdout.startswith(f"compiled {embedding_onnx} -> {tmp_path / 'm.tpk'} for cpu")
    # TENSORPRESS_TVM_LOG=1 shows them raw: the routing above really had something to hold back
    raw = tp(
        "compile", str(embedding_onnx), "-o", str(tmp_path / "raw.tpk"), env=dict(os.environ, TENSORPRESS_TVM_LOG="1")
    )
    assert any(TVM_LOG_LINE.match(line) for line in raw.stderr.splitlines()), raw.stderr


def test_the_same_input_gives_the_same_bytes_in_two_processes(embedding_onnx, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    paths = [tmp_path / "a.tpk", tmp_path / "b.tpk"]
    for path in paths:
        assert tp("compile", str(embedding_onnx), "-o", str(path), "--weights", "fp6", env=env).returncode == 0
    first, second = (hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
    assert first == second
    # asked for, the creation time is there (and the bytes then differ from the reproducible build)
    dated = tmp_path / "dated.tpk"
    assert (
        tp("compile", str(embedding_onnx), "-o", str(dated), "--weights", "fp6", "--record-time", env=env).returncode
        == 0
    )
    with zipfile.ZipFile(dated) as zf:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", json.loads(zf.read("manifest.json"))["created"])


def test_a_decoder_gives_the_same_bytes_in_three_processes(tmp_path):
    # The demo Llama's VM has shape functions of several slots, which TVM emits in hash order
    # (OrderShapeHeapStores puts them in one): this compared two different libraries before.
    model = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    paths = [tmp_path / "a.tpk", tmp_path / "b.tpk", tmp_path / "c.tpk"]
    for seed, path in enumerate(paths):  # other hash seeds, other allocations: other pointer orders
        result = tp(
            "compile", str(model), "-o", str(path), "--weights", "int8", env={**env, "PYTHONHASHSEED": str(seed)}
        )
        assert result.returncode == 0, result.stderr
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}) == 1


def test_an_existing_directory_as_output_is_refused(embedding_onnx, tmp_path):
    (tmp_path / "out").mkdir()
    line = one_error_line(tp("compile", str(embedding_onnx), "-o", str(tmp_path / "out")))
    out = tmp_path / "out"
    assert line == f"error: {out} is a directory; give the artifact a file name, e.g. {out / 'model.tpk'}."
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_an_unwritable_folder_is_refused_before_the_work(embedding_onnx, tmp_path):
    if os.geteuid() == 0:
        folder = Path("/sys")  # root ignores file modes; sysfs refuses new files to everyone
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
    before = sorted(os.listdir(folder))
    line = one_error_line(tp("compile", str(embedding_onnx), "-o", str(folder / "m.tpk")))  # no "importing" line
    assert line == (
        f"error: cannot write {folder / 'm.tpk'}: folder {folder} is not writable (permission denied); "
        "choose another artifact."
    )
    assert sorted(os.listdir(folder)) == before


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("ids=-1,8", "input shape ids=[-1, 8]: axis 0 is -1; sizes must be 1 or more."),
        ("ids=1,9", "input shape ids=[1, 9] does not fit the model's input ids=[1, 8]: axis 1 is fixed at 8."),
        ("ids=1,8,2", "input shape ids=[1, 8, 2] has 3 dims, but the model's input ids has 2: ids=[1, 8]."),
        ("ids=1,", "input shape ids=[1, ]: axis 1 is '', neither a size nor a name such as 'batch'."),
    ],
)
def test_bad_input_shapes_are_one_sentence(embedding_onnx, tmp_path, shape, message):
    line = one_error_line(tp("compile", str(embedding_onnx), "-o", str(tmp_path / "m.tpk"), "--input-shape", shape))
    assert line == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_inspect_into_a_closed_pipe_ends_quietly(embedding_onnx, tmp_path):
    """`tensorpress inspect m.tpk | head -0`: the reader is gone before the first line is written."""
    artifact = tensorpress.compile(embedding_onnx, tmp_path / "m.tpk").artifact
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: the first write gets EPIPE
    proc = subprocess.run(
        [sys.executable, "-m", "tensorpress", "inspect", str(artifact)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141  # 128 + SIGPIPE, as cat reports it


def test_inspect_piped_into_head(embedding_onnx, tmp_path):
    """A real shell pipe: head takes the first line and leaves; inspect says nothing on stderr."""
    artifact = tensorpress.compile(embedding_onnx, tmp_path / "m.tpk").artifact
    script = f'"{sys.executable}" -m tensorpress inspect "{artifact}" | head -1; exit "${{PIPESTATUS[0]}}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith(f"{artifact}: tensorpress artifact") and result.stdout.count("\n") == 1
    assert result.stderr == "" and result.returncode in (0, 141)
