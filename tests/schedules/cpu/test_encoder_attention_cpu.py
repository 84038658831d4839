"""The encoder attention kernel (schedules/encoder_attention.py) as the CPU rule writes it, built with the
project's TIR pipeline (PropagateNaN included), against torch's scaled_dot_product_attention and a float64
numpy reference of the unfused graph: sequence lengths that are and are not multiples of 8, padded keys,
fully masked rows, NaN in every input, each mask broadcast, both q/k/v layouts; and planted bugs it must
catch."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import tirx

import tensorpress.schedules.cpu.encoder_attention as rule_module
from tensorpress.compiler.build import tir_pipeline
from tensorpress.compiler.targets import parse_target
from tensorpress.runtime.host_cpu import missing_cpu_flags
from tensorpress.schedules.encoder_attention import EncoderAttention, encoder_attention_func

BERT = EncoderAttention(heads=3, head_dim=16, q_scale=0.5, k_scale=0.5, mask_broadcast=(False, True, True))
TORCH_SDPA = dataclasses.replace(BERT, mask_broadcast=(False, True, False), zero_masked_rows=True)
ONNX_SDPA = dataclasses.replace(TORCH_SDPA, zero_masked_rows=False, zero_nan_rows=True)  # Where(IsNaN(p), 0, p)


def _build(func: tirx.PrimFunc, level: str = "cpu"):
    target = parse_target(level).tvm_target()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline())["main"]


def _scheduled(config: EncoderAttention, level: str = "cpu"):
    """The kernel as the CPU rule schedules it for `level` (cpu: x86-64-v3, AVX2's 16 registers)."""
    target = parse_target(level).tvm_target()
    with target:
        sch = rule_module.EncoderAttention().apply(encoder_attention_func(config), target, False)
    assert sch is not None
    return _build(sch.mod["main"], level)


@functools.cache
def _kernel(config: EncoderAttention, level: str = "cpu"):
    return _scheduled(config, level)


def _inputs(config: EncoderAttention, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((batch, seq, 3, config.heads, config.head_dim)).astype(np.float32)
    arrays = {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2], "qkv": qkv}
    if config.mask_broadcast is not None:
        full = (batch, config.heads, seq)
        shape = [1 if b else n for b, n in zip(config.mask_broadcast, full)] + [seq]
        arrays["mask"] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return arrays


def _run(kernel, config: EncoderAttention, arrays: dict[str, np.ndarray]) -> np.ndarray:
    names = ["qkv"] if config.stacked_qkv else ["q", "k", "v"]
    names += ["mask"] if config.mask_broadcast is not None else []
    args = [tvm.runtime.tensor(np.ascontiguousarray(arrays[n])) for n in names]
    batch, seq = arrays["q"].shape[:2]
    out = tvm.runtime.tensor(np.full((batch, seq, config.heads, config.head_dim), 7.0, np.float32))
    kernel(*args, out)
    return out.numpy()


def _reference(config: EncoderAttention, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The unfused graph in float64: scores, + mask, softmax (NaN where a row is all -inf), where."""
    q, k, v = (arrays[n].astype(np.float64).transpose(0, 2, 1, 3) for n in ("q", "k", "v"))
    with np.errstate(invalid="ignore", over="ignore"):
        s = (q * config.q_scale) @ (k * config.k_scale).transpose(0, 1, 3, 2) * config.s_scale
        if config.mask_broadcast is not None:
            s = s + arrays["mask"].astype(np.float64)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        if config.zero_masked_rows:
            p = np.where((s != -np.inf).any(axis=-1, keepdims=True), p, 0.0)
        if config.zero_nan_rows:
            p = np.where(np.isnan(p), 0.0, p)
        return (p @ v).transpose(0, 2, 1, 3)


def _assert_matches(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN positions differ")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, equal_nan=True)


def _padded(config: EncoderAttention, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs whose later sequences have their last keys padded (mask -inf), as a tokenizer pads."""
    arrays = _inputs(config, batch, seq, seed)
    for b in range(1, batch):
        arrays["mask"][b, ..., seq - min(seq - 1, 3 * b) :] = -np.inf
    return arrays


@pytest.mark.parametrize("seq", [1, 2, 7, 8, 9, 15, 16, 17, 33, 64, 65, 127, 129, 200])
def test_matches_torch_sdpa_with_padded_keys(seq):
    arrays = _padded(BERT, 3, seq, seed=seq)
    got = _run(_kernel(BERT), BERT, arrays)
    to_heads = lambda a: torch.from_numpy(a).transpose(1, 2).double()  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(
        to_heads(arrays["q"]), to_heads(arrays["k"]), to_heads(arrays["v"]),
        attn_mask=torch.from_numpy(arrays["mask"]).double(), scale=BERT.q_scale * BERT.k_scale,
    ).transpose(1, 2).numpy()  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "config",
    [
        dataclasses.replace(TORCH_SDPA, mask_broadcast=(True, True, True)),
        dataclasses.replace(TORCH_SDPA, mask_broadcast=(False, False, False), s_scale=0.125, q_scale=1.0),
        dataclasses.replace(TORCH_SDPA, mask_broadcast=None, k_scale=1.0),
        dataclasses.replace(TORCH_SDPA, stacked_qkv=True),
        dataclasses.replace(TORCH_SDPA, heads=2, head_dim=64),
        dataclasses.replace(ONNX_SDPA, stacked_qkv=True),
    ],
    ids=["mask_1x1x1xS", "mask_BxHxSxS_score_scale", "no_mask", "stacked_qkv", "head_dim_64", "onnx_guard"],
)
def test_each_variant_matches_the_unfused_graph(config):
    for batch, seq in ((2, 37), (1, 128)):
        arrays = _inputs(config, batch, seq, seed=seq)
        _assert_matches(_run(_kernel(config), config, arrays), _reference(config, arrays))


@pytest.mark.skipif(bool(missing_cpu_flags(parse_target("cpu:x86-64-v4").cpu_flags)), reason="no AVX-512 here")
def test_avx512_targets_larger_register_tiles_match_the_unfused_graph():
    for batch, seq in ((2, 37), (1, 128)):
        arrays = _padded(TORCH_SDPA, batch, seq, seed=seq)
        arrays["mask"][0, 0, 3, :] = -np.inf
        got = _run(_kernel(TORCH_SDPA, "cpu:x86-64-v4"), TORCH_SDPA, arrays)
        _assert_matches(got, _reference(TORCH_SDPA, arrays))
    config, arrays, zeroed = _onnx_nan_case("q", 37, stacked=True)
    got = _run(_kernel(config, "cpu:x86-64-v4"), config, arrays)
    _assert_matches(got, _reference(config, arrays))
    assert (got[zeroed] == 0).all()


def test_fully_masked_rows_give_zeros_as_torchs_export_and_nan_otherwise():
    arrays = _inputs(TORCH_SDPA, 2, 19)
    arrays["mask"][0, 0, 4, :] = -np.inf  # query row 4 of sequence 0 sees no key
    arrays["mask"][1, 0, :, 11] = -np.inf  # one key hidden from every query
    got = _run(_kernel(TORCH_SDPA), TORCH_SDPA, arrays)
    assert (got[0, 4] == 0).all() and np.isfinite(got).all()
    _assert_matches(got, _reference(TORCH_SDPA, arrays))
    plain_softmax = dataclasses.replace(TORCH_SDPA, zero_masked_rows=False)
    got = _run(_kernel(plain_softmax), plain_softmax, arrays)
    assert np.isnan(got[0, 4]).all() and np.isfinite(np.delete(got[0], 4, axis=0)).all()
    _assert_matches(got, _reference(plain_softmax, arrays))


@pytest.mark.parametrize("where", ["q", "k", "v", "mask", "v_of_masked_key"])
def test_nan_reaches_the_outputs_the_unfused_graph_makes_nan(where):
    arrays = _inputs(TORCH_SDPA, 2, 21)
    arrays["mask"][1, 0, 6, :] = -np.inf  # a fully masked row: p = 0, but 0 · NaN is NaN
    if where == "mask":
        arrays["mask"][0, 0, 3, 5] = np.nan
    elif where == "v_of_masked_key":
        arrays["mask"][1, 0, :, 9] = -np.inf
        arrays["v"][1, 9, 2, 7] = np.nan
    else:
        arrays[where][1, 9, 2, 7] = np.nan
    got = _run(_kernel(TORCH_SDPA), TORCH_SDPA, arrays)
    want = _reference(TORCH_SDPA, arrays)
    assert np.isnan(want).any() and np.isfinite(want).any()
    _assert_matches(got, want)


def _onnx_nan_case(where: str, seq: int, seed: int = 0, stacked: bool = False):
    """ONNX_SDPA's inputs with one NaN or inf planted `where`, and the outputs the guard must zero."""
    config = dataclasses.replace(ONNX_SDPA, stacked_qkv=stacked)
    arrays = _inputs(config, 2, seq, seed)
    arrays["mask"][1, 0, 6, :] = -np.inf  # a fully masked row: NaN in softmax, zeroed by the guard
    zeroed = np.zeros((2, seq, config.heads, config.head_dim), bool)
    zeroed[1, 6] = True
    if where in ("q", "q_inf"):  # one query row's scores: NaN, or both +inf and -inf
        arrays["q"][1, 9, 2, 7] = np.nan if where == "q" else np.inf
        zeroed[1, 9, 2] = True
    elif where == "k_of_masked_key":  # NaN + -inf is NaN: every row of that head
        arrays["mask"][1, 0, :, 4] = -np.inf
        arrays["k"][1, 4, 2, 7] = np.nan
        zeroed[1, :, 2] = True
    elif where == "mask":
        arrays["mask"][0, 0, 3, 5] = np.nan
        zeroed[0, 3] = True
    elif where == "v":  # p·v: 0·NaN stays NaN, also in the zeroed rows
        arrays["v"][1, 9, 2, 7] = np.nan
    if stacked:
        arrays["qkv"] = np.stack([arrays["q"], arrays["k"], arrays["v"]], axis=2)
    return config, arrays, zeroed


@pytest.mark.parametrize("where", ["q", "q_inf", "k_of_masked_key", "mask", "v"])
@pytest.mark.parametrize("stacked", [False, True], ids=["qkv", "stacked"])
def test_zero_nan_rows_zeroes_what_where_isnan_zeroes(where, stacked):
    config, arrays, zeroed = _onnx_nan_case(where, 21, stacked=stacked)
    want = _reference(config, arrays)
    got = _run(_kernel(config), config, arrays)
    _assert_matches(got, want)
    expected_nan = np.zeros_like(zeroed)
    if where == "v":
        expected_nan[1, :, 2, 7] = True  # every row of sequence 1, head 2, channel 7, zeroed rows included
    assert (np.isnan(got) == expected_nan).all()
    assert (got[zeroed & ~expected_nan] == 0).all() and (got[~zeroed] != 0).all()


def test_one_guard_at_a_time():
    with pytest.raises(ValueError, match="one guard"):
        dataclasses.replace(ONNX_SDPA, zero_masked_rows=True)


def test_zero_nan_rows_definition_matches_the_reference():
    for where in ("q", "k_of_masked_key", "mask", "v"):
        config, arrays, _ = _onnx_nan_case(where, 13)
        definition = _build(encoder_attention_func(config))
        _assert_matches(_run(definition, config, arrays), _reference(config, arrays))


def test_large_negative_mask_values_as_hf_eager_masks():
    arrays = _inputs(BERT, 2, 24)
    arrays["mask"][1, ..., 20:] = np.finfo(np.float32).min
    _assert_matches(_run(_kernel(BERT), BERT, arrays), _reference(BERT, arrays))


def test_the_definition_itself_matches_the_reference():
    arrays = _padded(TORCH_SDPA, 2, 13)
    arrays["mask"][0, 0, 2, :] = -np.inf
    definition = _build(encoder_attention_func(TORCH_SDPA))
    _assert_matches(_run(definition, TORCH_SDPA, arrays), _reference(TORCH_SDPA, arrays))


# ---------------------------------------------------------------------------------------- planted bugs


def _with_program_mutated(monkeypatch, mutate):
    program = rule_module.attention_program
    monkeypatch.setattr(rule_module, "attention_program", lambda bufs, *rest: mutate(bufs, program(bufs, *rest)))


def _key_tail_off_by_one(bufs, body):
    """The loop that pads the keys past S with -inf starts at S - 1: the last key is dropped."""

    def start_early(loop: tirx.For):
        if loop.min.same_as(bufs.seq):
            return tirx.For(loop.loop_var, bufs.seq - 1, loop.extent + 1, loop.kind, loop.body)
        return loop

    return tvm_ffi.structural_map(body, (tirx.For, start_early))


def _dropped_row_block(bufs, body):
    """The parallel loop over (batch, head, query block) runs one task short."""

    def short(loop: tirx.For):
        if loop.kind == tirx.ForKind.PARALLEL:
            return tirx.For(loop.loop_var, loop.min, loop.extent - 1, loop.kind, loop.body)
        return loop

    return tvm_ffi.structural_map(body, (tirx.For, short))


def _plant(monkeypatch, bug: str) -> None:
    if bug == "key_tail_off_by_one":
        _with_program_mutated(monkeypatch, _key_tail_off_by_one)
    elif bug == "dropped_row_block":
        _with_program_mutated(monkeypatch, _dropped_row_block)
    elif bug == "mask_ignored":
        no_mask = lambda self, b, h, i, j: tirx.const(0.0, "float32")  # noqa: E731
        monkeypatch.setattr(rule_module.AttentionBuffers, "mask_at", no_mask)
    elif bug == "nan_rows_not_zeroed":
        program = rule_module.attention_program

        def unguarded(bufs, *rest):
            config = dataclasses.replace(bufs.config, zero_nan_rows=False)
            return program(dataclasses.replace(bufs, config=config), *rest)

        monkeypatch.setattr(rule_module, "attention_program", unguarded)
    elif bug == "nan_rows_inverse_kept":  # the row's e zeroed, but still scaled by 1/NaN
        monkeypatch.setattr(rule_module.tirx, "Select", _select_keeping_nan_inverse)
    elif bug == "wrong_scale":
        program = rule_module.attention_program

        def wrong_scale(bufs, *rest):
            config = dataclasses.replace(bufs.config, k_scale=bufs.config.k_scale * 1.1)
            return program(dataclasses.replace(bufs, config=config), *rest)

        monkeypatch.setattr(rule_module, "attention_program", wrong_scale)


@pytest.mark.parametrize("bug", ["key_tail_off_by_one", "mask_ignored", "wrong_scale", "dropped_row_block"])
def test_planted_bugs_are_caught(monkeypatch, bug):
    _plant(monkeypatch, bug)
    kernel = _scheduled(BERT)
    arrays = _padded(BERT, 2, 65, seed=1)
    with pytest.raises(AssertionError):
        _assert_matches(_run(kernel, BERT, arrays), _reference(BERT, arrays))


_SELECT = tirx.Select


def _select_keeping_nan_inverse(cond, a, b):
    """tirx.Select, except the guard's Select(isnan(l), 1, 1 / l) keeps 1 / l."""
    if isinstance(cond, tvm.ir.Call) and getattr(cond.op, "name", "") == "tirx.isnan":
        return b
    return _SELECT(cond, a, b)


@pytest.mark.parametrize("bug", ["nan_rows_not_zeroed", "nan_rows_inverse_kept"])
def test_planted_bugs_in_the_nan_guard_are_caught(monkeypatch, bug):
    _plant(monkeypatch, bug)
    config, arrays, _ = _onnx_nan_case("q", 21)
    kernel = _scheduled(config)
    with pytest.raises(AssertionError):
        _assert_matches(_run(kernel, config, arrays), _reference(config, arrays))
