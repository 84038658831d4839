"""FuseEncoderAttention on ONNX exports, whose guard against NaN probabilities is `Where(IsNaN(p), 0, p)`:
MiniLM exported by torch.onnx becomes one zero_nan_rows kernel per layer and gives onnxruntime's answers on
padded and fully padded sequences; a small attention graph of the export's form gives onnxruntime's and a
float64 numpy model's answers, NaN and zeros in the same places, with NaN or inf planted in q, k, v and the
mask; guards that only look alike are left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from reference_models import export_minilm_onnx
from tvm import relax

import tensorpress
from tensorpress.compiler.api import import_for_compile
from tensorpress.compiler.passes.fuse_encoder_attention import find_attention_sites
from tensorpress.compiler.pipeline import rewrite_for_target
from tensorpress.compiler.targets import parse_target
from tensorpress.frontend import import_model

HEADS, HEAD_DIM = 3, 16


def _count_ops(mod, name: str) -> int:
    found: list = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == name else None,
    )
    return len(found)


def _kernel_calls(mod) -> list[str]:
    return [
        e.args[0].name_hint
        for block in mod["main"].body.blocks
        for e in (b.value for b in block.bindings)
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir"
    ]


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory) -> Path:
    return export_minilm_onnx(tmp_path_factory.mktemp("minilm_onnx") / "minilm.onnx")


def test_minilm_onnx_export_fuses_and_matches_onnxruntime_on_padded_sequences(minilm_onnx, tmp_path):
    spec = parse_target("cpu")
    prepared = import_for_compile(minilm_onnx, spec)
    assert _count_ops(prepared.imported.mod, "relax.isnan") == 6  # the export's guard, one per layer
    mod = rewrite_for_target(prepared.imported, spec, prepared.recipe).model.mod
    fused = [c for c in _kernel_calls(mod) if c.startswith("encoder_attention")]
    assert len(fused) == 6 and all(c.endswith("zero_nan_rows_stacked_qkv") for c in fused)
    for op in ("relax.nn.softmax", "relax.isnan", "relax.split", "relax.permute_dims", "relax.matmul"):
        assert _count_ops(mod, op) == 0, op

    report = tensorpress.compile(minilm_onnx, tmp_path / "minilm.tpk", target="cpu", tuning_log=False)
    model = tensorpress.runtime.load(report.artifact)
    session = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 20000, (3, 23)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :] = 0  # no token at all: every probability of the sequence is NaN, zeroed by the guard
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (got,) = model.run(feeds)
    (want,) = session.run(None, feeds)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


def guarded_attention_onnx(path: Path, guard: str = "where_isnan") -> Path:
    """torch.onnx's export of scaled_dot_product_attention with a boolean mask, written out with a float
    mask input (so that it can hold NaN): q, k, v [B, S, H, D], mask [B, 1, S, S], out [B, S, H, D].
    guard: the export's Where(IsNaN(p), 0, p), or a near miss (IsNaN of the scores, Where's value 1,
    Where's branches swapped)."""
    scale = float(np.sqrt(1.0 / np.sqrt(HEAD_DIM)))
    constants = {"scale": ([], scale), "zero": ([1], 0.0), "one": ([1], 1.0)}  # Constant nodes, as torch writes
    nodes = [
        helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, dims, [value]))
        for name, (dims, value) in constants.items()
    ]
    nodes += [
        helper.make_node("Transpose", ["q"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v"], ["v4"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["q4", "scale"], ["qs"]),
        helper.make_node("Mul", ["kT", "scale"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["s"]),
        helper.make_node("Add", ["s", "mask"], ["x"]),
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["x" if guard == "isnan_of_scores" else "p"], ["nan"]),
        helper.make_node(
            "Where",
            ["nan", "p", "zero"] if guard == "swapped" else ["nan", "one" if guard == "value_one" else "zero", "p"],
            ["g"],
        ),
        helper.make_node("MatMul", ["g", "v4"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["out"], perm=[0, 2, 1, 3]),
    ]
    heads = ["batch", "seq", HEADS, HEAD_DIM]
    graph = helper.make_graph(
        nodes,
        "guarded_attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, heads) for n in ("q", "k", "v")]
        + [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "seq", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, heads)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def _numpy_model(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The graph in float64: softmax's NaN rows (NaN or +inf scores, or every score -inf) zeroed."""
    q, k, v = (feeds[n].astype(np.float64).transpose(0, 2, 1, 3) for n in ("q", "k", "v"))
    with np.errstate(invalid="ignore", over="ignore"):
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM) + feeds["mask"].astype(np.float64)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        return (np.where(np.isnan(p), 0.0, p) @ v).transpose(0, 2, 1, 3)


def _planted(where: str, seed: int = 3) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Random feeds (batch 2, seq 19: padded keys, one fully masked query row) with NaN or inf planted
    `where`, and the outputs the guard must zero."""
    batch, seq = 2, 19
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal((batch, seq, HEADS, HEAD_DIM)).astype(np.float32) for n in ("q", "k", "v")}
    feeds["mask"] = np.zeros((batch, 1, seq, seq), np.float32)
    feeds["mask"][1, 0, :, 15:] = -np.inf  # padded keys
    feeds["mask"][1, 0, 4, :] = -np.inf  # a query row that sees no key
    zeroed = np.zeros((batch, seq, HEADS, HEAD_DIM), bool)
    zeroed[1, 4] = True
    if where == "q":
        feeds["q"][0, 7, 1, 3] = np.nan  # one row of one head
        zeroed[0, 7, 1] = True
    elif where == "q_inf":  # scores +inf and -inf: softmax gives NaN
        feeds["q"][0, 7, 1, 3] = np.inf
        zeroed[0, 7, 1] = True
    elif where == "mask":
        feeds["mask"][0, 0, 11, 5] = np.nan  # one query row, every head
        zeroed[0, 11] = True
    elif where == "k_of_padded_key":  # NaN + -inf is NaN: every row of the head
        feeds["k"][1, 17, 2, 0] = np.nan
        zeroed[1, :, 2] = True
    return feeds, zeroed


@pytest.fixture(scope="module")
def guarded_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    path = guarded_attention_onnx(folder / "guarded.onnx")
    report = tensorpress.compile(path, folder / "guarded.tpk", target="cpu", tuning_log=False)
    fused = [k for k in report.manifest["kernels"] if k.startswith("encoder_attention")]
    assert fused == [f"encoder_attention_h{HEADS}_d{HEAD_DIM}_maskn1n_zero_nan_rows"]
    return tensorpress.runtime.load(report.artifact), ort.InferenceSession(str(path))


@pytest.mark.parametrize("where", ["none", "q", "q_inf", "mask", "k_of_padded_key"])
def test_guarded_attention_is_nan_and_zero_where_onnxruntime_is(guarded_model, where):
    model, session = guarded_model
    feeds, zeroed = _planted(where)
    (got,) = model.run(feeds)
    (want,) = session.run(None, feeds)
    assert np.isfinite(want).all() and (want[zeroed] == 0).all() and (want[~zeroed] != 0).all()
    np.testing.assert_array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, _numpy_model(feeds), rtol=1e-4, atol=1e-5)


def test_nan_in_v_stays_nan_in_the_zeroed_rows_too(guarded_model):
    model, session = guarded_model
    feeds, zeroed = _planted("q")
    feeds["v"][0, 2, 1, 9] = np.nan  # p·v: 0·NaN is NaN, so channel 9 of head 1 of sequence 0, every row
    (got,) = model.run(feeds)
    (want,) = session.run(None, feeds)
    assert np.isnan(want[0, :, 1, 9]).all() and np.isnan(want).sum() == want.shape[1]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert (got[zeroed & ~np.isnan(want)] == 0).all()


@pytest.mark.parametrize("guard", ["where_isnan", "isnan_of_scores", "value_one", "swapped"])
def test_guards_that_only_look_alike_are_left_alone(tmp_path, guard):
    imported = import_model(guarded_attention_onnx(tmp_path / f"{guard}.onnx", guard))
    sites = find_attention_sites(imported.mod["main"])
    assert len(sites) == (1 if guard == "where_isnan" else 0)  # the export's own form is taken
    if sites:
        assert sites[0].config.zero_nan_rows and not sites[0].config.zero_masked_rows
