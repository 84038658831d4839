"""Encoder (BERT-style) self-attention as one kernel: out = softmax(q·kᵀ·scale + mask)·v per head.

The graph pass `compiler/passes/fuse_encoder_attention.py` puts a call to this kernel where it finds the
unfused ops; the CPU rule `schedules/cpu/encoder_attention.py` schedules it. Layouts (B batch and S
sequence symbolic, H heads and D head_dim static, all float32):

    q, k, v   [B, S, H, D]     the linear layers' outputs with the heads split off (no transpose), or
    qkv       [B, S, 3, H, D]  the stacked q/k/v linear's output (`fuse_parallel_linears`) read in place
    mask      [MB, MH, MS, S]  additive, each of MB, MH, MS either 1 (broadcast) or B, H, S
    out       [B, S, H, D]     heads still split off: the graph's [B, S, H·D] is a reshape of it

Per (b, h, query row i), exactly as the unfused graph computes it:

    s_j  = (q_i·q_scale)·(k_j·k_scale) · s_scale + mask[b, h, i, j]      j < S
    m    = max_j s_j,  e_j = exp(s_j - m),  l = Σ_j e_j
    out  = Σ_j e_j v_j / l
    zero_masked_rows (torch's scaled_dot_product_attention export): a row whose every s_j is -inf gives
         p = 0 (so out = Σ_j 0·v_j: zeros, NaN where v has one) instead of softmax's NaN.
    zero_nan_rows (the ONNX export of it, `Where(IsNaN(p), 0, p)`): a row whose p is NaN gives p = 0,
         out = Σ_j 0·v_j. softmax's p is NaN for a whole row or none of it: NaN exactly where l is, that
         is where some s_j is NaN or +inf or every s_j is -inf (a NaN in q, k or the mask included).

Otherwise NaN anywhere in a row's scores makes the row NaN (max, exp and the sums propagate it, as the
unfused softmax does); NaN in v reaches every row, as 0·NaN does in the unfused p·v.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm import tirx
from tvm.s_tir.stmt import SBlock, SBlockRealize
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

KERNEL_ATTR = "tensorpress.kernel"
ENCODER_ATTENTION = "encoder_attention"
CONFIG_ATTR = "tensorpress.encoder_attention"
_OPAQUE = 8  # op_pattern kOpaque: FuseOps leaves the kernel alone, so the rule sees it as defined


@dataclass(frozen=True)
class EncoderAttention:
    """What one kernel computes (module docstring). mask_broadcast: for the mask's batch, head and
    query axes, whether each has size 1 (None: no mask)."""

    heads: int
    head_dim: int
    q_scale: float = 1.0
    k_scale: float = 1.0
    s_scale: float = 1.0
    mask_broadcast: tuple[bool, bool, bool] | None = None
    zero_masked_rows: bool = False
    stacked_qkv: bool = False
    zero_nan_rows: bool = False

    def __post_init__(self):
        if self.zero_masked_rows and self.zero_nan_rows:  # one guard: the CPU rule implements each alone
            raise ValueError("zero_nan_rows already zeroes the fully masked rows: set one guard, not both")

    def name(self) -> str:
        mask = (
            "nomask"
            if self.mask_broadcast is None
            else "mask" + "".join("1" if b else "n" for b in self.mask_broadcast)
        )
        parts = [f"encoder_attention_h{self.heads}_d{self.head_dim}", mask]
        parts += ["zero_masked_rows"] * self.zero_masked_rows + ["zero_nan_rows"] * self.zero_nan_rows
        parts += ["stacked_qkv"] * self.stacked_qkv
        return "_".join(parts)


def config_of(func: tirx.PrimFunc) -> EncoderAttention | None:
    """The EncoderAttention a PrimFunc of this file computes (None for any other function)."""
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or func.attrs.get(KERNEL_ATTR) != ENCODER_ATTENTION:
        return None
    fields = dict(func.attrs[CONFIG_ATTR])
    mask = fields["mask_broadcast"]
    return EncoderAttention(
        heads=int(fields["heads"]),
        head_dim=int(fields["head_dim"]),
        q_scale=float(fields["q_scale"]),
        k_scale=float(fields["k_scale"]),
        s_scale=float(fields["s_scale"]),
        mask_broadcast=None if mask is None or len(mask) == 0 else (bool(mask[0]), bool(mask[1]), bool(mask[2])),
        zero_masked_rows=bool(fields["zero_masked_rows"]),
        stacked_qkv=bool(fields["stacked_qkv"]),
        zero_nan_rows=bool(fields["zero_nan_rows"]),
    )


@dataclass(frozen=True)
class AttentionBuffers:
    """The kernel's buffers and its two symbolic sizes; `load(0 | 1 | 2, b, j, h, d)` reads q, k or v in
    either layout, `mask_at(b, h, i, j)` the mask through its broadcast axes."""

    inputs: list[tirx.Buffer]
    mask: tirx.Buffer | None
    out: tirx.Buffer
    batch: tirx.Var
    seq: tirx.Var
    config: EncoderAttention

    def load(self, which: int, b, j, h, d):
        if self.config.stacked_qkv:
            return self.inputs[0][b, j, which, h, d]
        return self.inputs[which][b, j, h, d]

    def mask_at(self, b, h, i, j):
        broadcast = self.config.mask_broadcast
        assert broadcast is not None and self.mask is not None
        zero = tirx.const(0, "int64")
        return self.mask[zero if broadcast[0] else b, zero if broadcast[1] else h, zero if broadcast[2] else i, j]


def attention_buffers(config: EncoderAttention) -> AttentionBuffers:
    """Fresh buffers of the kernel's parameters (module docstring's shapes)."""
    batch, seq = tirx.Var("B", "int64"), tirx.Var("S", "int64")
    H, D = tirx.IntImm("int64", config.heads), tirx.IntImm("int64", config.head_dim)
    one = tirx.IntImm("int64", 1)
    if config.stacked_qkv:
        inputs = [tirx.decl_buffer((batch, seq, tirx.IntImm("int64", 3), H, D), "float32", "qkv")]
    else:
        inputs = [tirx.decl_buffer((batch, seq, H, D), "float32", name) for name in ("q", "k", "v")]
    mask = None
    if config.mask_broadcast is not None:
        dims = [one if b else full for b, full in zip(config.mask_broadcast, (batch, H, seq))]
        mask = tirx.decl_buffer((*dims, seq), "float32", "mask")
    out = tirx.decl_buffer((batch, seq, H, D), "float32", "out")
    return AttentionBuffers(inputs, mask, out, batch, seq, config)


def kernel_params(bufs: AttentionBuffers) -> list[tirx.Buffer]:
    """The kernel's parameters in call order: q, k, v (or qkv), the mask when there is one, out."""
    return [*bufs.inputs, *([bufs.mask] if bufs.mask is not None else []), bufs.out]


def encoder_attention_func(config: EncoderAttention) -> tirx.PrimFunc:
    """The kernel's definition: plain loops over every (b, h, i), one row of scores at a time. Correct on
    any target and slow; the CPU rule (`schedules/cpu/encoder_attention.py`) writes the tiled program."""
    bufs = attention_buffers(config)
    return kernel_func(bufs, _definition(bufs))


def kernel_func(bufs: AttentionBuffers, body: tirx.Stmt) -> tirx.PrimFunc:
    """A PrimFunc over the kernel's parameters with `body`, marked as this file's kernel."""
    fields = asdict(bufs.config)
    fields["mask_broadcast"] = [] if bufs.config.mask_broadcast is None else list(bufs.config.mask_broadcast)
    attrs = {"tirx.noalias": True, KERNEL_ATTR: ENCODER_ATTENTION, CONFIG_ATTR: fields, "op_pattern": _OPAQUE}
    root = SBlockRealize([], tirx.const(True, "bool"), SBlock([], [], [], "root", body))
    return tirx.PrimFunc(kernel_params(bufs), root).with_attrs(attrs)


def _definition(bufs: AttentionBuffers) -> tirx.Stmt:
    config = bufs.config
    B, S, H, D = bufs.batch, bufs.seq, config.heads, config.head_dim
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    neg_inf = f32(float("-inf"))
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731
    with IRBuilder() as ib, T.serial(i64(0), B) as b, T.serial(i64(0), i64(H)) as h, T.serial(i64(0), S) as i:
        score = T.decl_buffer((S,), "float32", scope="global")
        row = T.decl_buffer((3,), "float32", scope="local")  # max, sum, any score not -inf
        with T.serial(i64(0), S) as j:
            T.buffer_store(score, f32(0.0), [j])
            with T.serial(i64(0), i64(D)) as d:
                q = bufs.load(0, b, i, h, d) * f32(config.q_scale)
                k = bufs.load(1, b, j, h, d) * f32(config.k_scale)
                T.buffer_store(score, score[j] + q * k, [j])
            s = score[j] * f32(config.s_scale)
            if config.mask_broadcast is not None:
                s = s + bufs.mask_at(b, h, i, j)
            T.buffer_store(score, s, [j])
        T.buffer_store(row, neg_inf, [0])
        T.buffer_store(row, f32(0.0), [1])
        T.buffer_store(row, f32(0.0), [2])
        with T.serial(i64(0), S) as j:
            T.buffer_store(row, tirx.max(row[0], score[j]), [0])
            T.buffer_store(row, tirx.max(row[2], tirx.Select(score[j] != neg_inf, f32(1.0), f32(0.0))), [2])
        with T.serial(i64(0), S) as j:
            e = tirx.exp(score[j] - row[0])
            if config.zero_masked_rows:
                e = tirx.Select(row[2] > f32(0.0), e, f32(0.0))
            T.buffer_store(score, e, [j])
            T.buffer_store(row, row[1] + score[j], [1])
        nan_row = tirx.isnan(row[1])  # l is NaN exactly where softmax's p is (module docstring)
        with T.serial(i64(0), i64(D)) as d:
            T.buffer_store(bufs.out, f32(0.0), [b, i, h, d])
            with T.serial(i64(0), S) as j:
                p = tirx.Select(nan_row, f32(0.0), score[j]) if config.zero_nan_rows else score[j]
                value = bufs.out[b, i, h, d] + p * bufs.load(2, b, j, h, d)
                T.buffer_store(bufs.out, value, [b, i, h, d])
            inv = f32(1.0) / row[1]
            if config.zero_masked_rows:
                inv = tirx.Select(row[2] > f32(0.0), inv, f32(1.0))
            if config.zero_nan_rows:
                inv = tirx.Select(nan_row, f32(1.0), inv)
            T.buffer_store(bufs.out, bufs.out[b, i, h, d] * inv, [b, i, h, d])
    return ib.get()
