"""An internal TVM error inside a compile comes out as one sentence naming the stage, the kernel with its
shapes and the target; nothing is written; the traceback only with --verbose or TENSORPRESS_DEBUG=1."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

import tensorpress
from tensorpress.cli import main
from tensorpress.errors import InternalCompileError
from tensorpress.schedules.cpu import row_reduction


@pytest.fixture
def broken_row_schedule(monkeypatch):
    """The row count RowReduction used before batch-1 shapes were handled: vectorises the row loop of a
    softmax over [1, N], which TVM's build rejects (VectorizeLoop before LiftStorageAlloc)."""
    schedule_rows = row_reduction._schedule_rows

    def old_schedule_rows(sch, infos, rows, lanes):
        sch = schedule_rows(sch, infos, rows, lanes)
        row_reduction.vectorize_innermost(sch, infos[-1].block_rv, lanes)
        return sch

    monkeypatch.setattr(row_reduction, "_row_loops", lambda sch, infos: 1)
    monkeypatch.setattr(row_reduction, "_schedule_rows", old_schedule_rows)


def _softmax_model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 10])],
        [helper.make_tensor_value_info("y", 1, [1, 10])],
    )
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_internal_build_error_names_stage_kernel_shapes_and_target(broken_row_schedule, tmp_path):
    out = tmp_path / "m.tpk"
    with pytest.raises(InternalCompileError) as err:
        tensorpress.compile(_softmax_model(tmp_path), out)
    message = str(err.value)
    assert "\n" not in message
    assert "build stage on kernel fast_softmax (x: float32[1, 10]" in message  # the kernel as the build names it
    assert "for target cpu" in message and "VectorizeLoop" in message
    assert err.value.__cause__ is not None  # the TVM error stays chained for --verbose
    assert not out.exists()


def test_cli_prints_one_line_and_the_traceback_only_when_asked(broken_row_schedule, tmp_path, capsys, monkeypatch):
    model, out = _softmax_model(tmp_path), tmp_path / "m.tpk"
    monkeypatch.delenv("TENSORPRESS_DEBUG", raising=False)
    assert main(["compile", str(model), "-o", str(out)]) == 1
    stderr = capsys.readouterr().err
    # the stage lines ("importing ...", "building ...") and then one error line, no traceback
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: tensorpress failed in its build stage")
    assert stderr.endswith(errors[0] + "\n") and "Traceback" not in stderr
    assert main(["compile", str(model), "-o", str(out), "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TENSORPRESS_DEBUG", "1")
    assert main(["compile", str(model), "-o", str(out)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not out.exists()
