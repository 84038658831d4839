"""The pieces of a decoder layer that touch the paged KV cache: RoPE, append, attention.

`PagedKV` is the per-call view of the cache that the model threads through its layers: the cache
tensors (updated in place by each layer's append; how many and how a row is stored is the KV-cache
format's business, see `compiler/formats/kv_cache.py`) and the metadata that says where each token goes:

    positions[N]       absolute position of each token in its sequence (int32)
    seq_slot[N]        row of `block_table` of each token's sequence (int32)
    block_table[B, M]  page ids of each sequence, in order (int32; unused entries are never read)

The kernels come from the KV-cache format the compiler hands to the import (`KVCacheKernels`): this
module only says where attention and the cache live.

A format may ask for rotations around the cache (`attention_rotations`, int2-oscar): then each layer
has a `KVRotation` (R_K, R_V per kv head, orthonormal model parameters the compiler calibrated) and
`attend` stores and reads everything rotated, so the cache, its kernels and the runtime never know:

    k' = R_K k,  q' = R_K q   (after RoPE; a query head uses its kv head's R_K)   q'·k' = q·k
    v' = R_V v,  out = R_Vᵀ out'                                                 Σ p v  unchanged
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op


class KVCacheKernels(Protocol):
    """What the frontend asks of the KV-cache format it is given (`compiler/formats/kv_cache.py`)."""

    name: str

    def cache_tensors(
        self, num_layers: int | str, kv_heads: int, page_size: int, head_dim: int, model_dtype: str
    ) -> list[Any]: ...

    def bytes_per_token(self, num_layers: int, kv_heads: int, head_dim: int, model_dtype: str) -> int: ...

    def code_bits(self, model_dtype: str) -> int: ...

    def append_kernel(self, kv_heads: int, head_dim: int, page_size: int, model_dtype: str) -> tirx.PrimFunc: ...

    def attention_kernel(
        self, heads: int, kv_heads: int, head_dim: int, page_size: int, model_dtype: str, phase: str
    ) -> tirx.PrimFunc: ...


def rope_func(num_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """Rotary embedding, rotate-half convention (Llama/Qwen2 in HF): x[N, heads, D] -> same shape.

    out[n, h, i] = x[n, h, i] * cos(a) + rot[n, h, i] * sin(a),  a = positions[n] * inv_freq[i mod D/2],
    rot = (-x[D/2:], x[:D/2]). Angles and products in fp32, like transformers.
    """
    half = head_dim // 2
    n = tirx.Var("n", "int64")
    x = te.placeholder((n, num_heads, head_dim), dtype, name="x")
    positions = te.placeholder((n,), "int32", name="positions")
    inv_freq = te.placeholder((half,), "float32", name="inv_freq")

    def rotate(i, h, d):
        angle = positions[i].astype("float32") * inv_freq[d % half]
        partner = tirx.if_then_else(d < half, -x[i, h, d + half], x[i, h, d - half])
        value = x[i, h, d].astype("float32") * tirx.cos(angle) + partner.astype("float32") * tirx.sin(angle)
        return value.astype(dtype)

    out = te.compute((n, num_heads, head_dim), rotate, name="rope")
    return te.create_prim_func([x, positions, inv_freq, out]).without_attr("global_symbol")


@dataclass
class PagedKV:
    """The cache tensors and per-token metadata of one prefill/decode call (see module docstring)."""

    cache: list[nn.Tensor]  # each [L, P, 2, KVH, PS, ...], in the format's order
    positions: nn.Tensor
    seq_slot: nn.Tensor
    block_table: nn.Tensor
    phase: str  # "prefill" or "decode": which attention kernel (and schedule) to use
    kernels: KVCacheKernels
    rotations: list[KVRotation] | None = None  # per layer, where the format asks for them

    @property
    def page_size(self) -> int:
        return int(self.cache[0].shape[4])

    def attend(self, layer: int, q: nn.Tensor, k: nn.Tensor, v: nn.Tensor) -> nn.Tensor:
        """Append k, v ([N, KVH, D]) of this layer to the pages, then attend q ([N, H, D]) over them."""
        _, heads, head_dim = (int(s) if isinstance(s, int) else s for s in q.shape)
        kv_heads = int(k.shape[1])
        dtype = q.dtype
        rotation = self.rotations[layer] if self.rotations is not None else None
        if rotation is not None:
            q, k, v = (
                rotation.rotate(q, rotation.key),
                rotation.rotate(k, rotation.key),
                rotation.rotate(v, rotation.value),
            )
        layer_arg = tirx.IntImm("int64", layer)
        append = self.kernels.append_kernel(kv_heads, head_dim, self.page_size, dtype)
        written = [nn.Tensor.placeholder(t.shape, t.dtype) for t in self.cache]
        updated = op.tensor_ir_inplace_op(
            append,
            "kv_append",
            [*self.cache, k, v, self.positions, self.seq_slot, self.block_table, layer_arg],
            inplace_indices=list(range(len(self.cache))),
            out=written if len(written) > 1 else written[0],
        )
        self.cache = list(updated) if len(written) > 1 else [updated]
        attention = self.kernels.attention_kernel(heads, kv_heads, head_dim, self.page_size, dtype, self.phase)
        out = op.tensor_ir_op(
            attention,
            f"paged_attention_{self.phase}",
            [q, *self.cache, self.positions, self.seq_slot, self.block_table, layer_arg],
            out=nn.Tensor.placeholder(q.shape, dtype),
        )
        return rotation.rotate(out, rotation.value, inverse=True) if rotation is not None else out


class KVRotation(nn.Module):
    """One layer's rotations of the cache (module docstring): key = R_K, value = R_V, each [KVH, D, D],
    orthonormal; a row x of kv head g is stored as R[g] x."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: str):
        self.key = nn.Parameter((kv_heads, head_dim, head_dim), dtype)
        self.value = nn.Parameter((kv_heads, head_dim, head_dim), dtype)

    @staticmethod
    def rotate(x: nn.Tensor, rotation: nn.Tensor, inverse: bool = False) -> nn.Tensor:
        """x [N, heads, D] -> R[g] x (or R[g]ᵀ x) per head, head h in kv head g = h // (heads / KVH)."""
        n, heads, head_dim = x.shape
        kv_heads = int(rotation.shape[0])
        grouped = op.reshape(x, (n, kv_heads, int(heads) // kv_heads, head_dim))
        # rows times Rᵀ is R times each row; rows times R is Rᵀ times each row
        matrix = rotation if inverse else op.permute_dims(rotation, [0, 2, 1])
        return op.reshape(op.matmul(grouped, matrix), (n, heads, head_dim))


def kv_rotations(num_layers: int, kv_heads: int, head_dim: int, dtype: str) -> nn.ModuleList:
    """A `KVRotation` per layer: the parameters kv_rotations.{layer}.key / .value of a decoder whose KV
    format asks for them."""
    return nn.ModuleList([KVRotation(kv_heads, head_dim, dtype) for _ in range(num_layers)])


def apply_rope(x: nn.Tensor, positions: nn.Tensor, inv_freq: np.ndarray) -> nn.Tensor:
    """RoPE on x [N, heads, D] at `positions` [N]; inv_freq [D/2] float32 becomes a constant."""
    heads, head_dim = int(x.shape[1]), int(x.shape[2])
    return op.tensor_ir_op(
        rope_func(heads, head_dim, x.dtype),
        "rope",
        [x, positions, nn.Tensor.from_const(inv_freq)],
        out=nn.Tensor.placeholder(x.shape, x.dtype),
    )
