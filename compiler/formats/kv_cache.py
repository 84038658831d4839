"""The KV-cache format kind: how the paged KV cache stores each K/V row, chosen by the compiler.

A KV format says, for one decoder shape (layers L, kv heads KVH, tokens per page PS, head_dim D):

    cache_tensors(...)   the tensors it keeps, in the order the compiled functions take them, each
                         page-major: [L, "num_pages", 2 (K/V), KVH, PS, ...per-row dims]
    bytes_per_token(...) bytes one token takes over all layers, K and V (the runtime sizes its pool by it)
    quantize / dequantize  the numpy reference: [T, D] rows -> the stored per-row arrays -> [T, D] rows
    append_func(...)     the TIR of the append kernel (quantise on write), a PrimFunc
    read(...)            the TIR expression of one element of a page row, dequantised to the model dtype:
                         the attention definition's ONE page read (its keys and values gathers use it)

How one K/V row of a token sits in the cache (every format keeps this page-major order, so the
runtime's page tables and the attention's addressing are the same for all of them):

    cache tensor t:  [L, P, 2, KVH, PS, *row_dims_t]
                          │  │   │    └─ row r of page p = the token at position page_slot * PS + r
                          │  │   └─ kv head g
                          │  └─ 0 = K, 1 = V
                          └─ page p (the runtime's block tables hand pages to sequences)

    the row (l, p, K/V, g, r) of every tensor together is one stored row; e.g. int8:
        kv_codes [.., r, 0:D] int8     ──┐  dequantize: code[d] * scale
        kv_scales[.., r]      float32  ──┘

`append_func` returns a PrimFunc with params (*cache tensors, k[N, KVH, D], v[N, KVH, D],
positions[N], seq_slot[N], block_table[B, M], layer) writing the cache in place. Its block named
"append" runs over the spatial axes (n, g, d) and writes the rows; a format that needs per-row
reductions first (an absmax scale) adds blocks before it whose leading loops are spatial axes (the
schedules spread those over threads and run the rest, reductions included, in one thread). The
kernel attributes (kernel name, op pattern) are added by `schedules/kv_attention.py`.

A format that quantises whole pages after they leave a full-precision window (int2-kitty) is a
`PageQuantisedKVFormat` (`kv_page_quantised.py`): two pools, a tagged block table, and one more kernel.

Plain Python: TVM is imported lazily, inside the TIR methods, so the registry imports without it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from tvm import tirx

NUM_PAGES = "num_pages"  # the symbolic page count in cache shapes; the runtime picks it
NUM_LAYERS = "num_layers"  # stands for L where a shape is built for a kernel (L is symbolic there)


@dataclass(frozen=True)
class CacheTensor:
    """One tensor of the KV cache: name (the compiled functions' parameter), shape with "num_pages"
    left symbolic, dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def bytes_per_page(self) -> int:
        """Bytes of one page of this tensor (every dim but the symbolic page count)."""
        dims = [int(d) for d in self.shape if not isinstance(d, str)]
        return math.prod(dims) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


class KVCacheFormat(abc.ABC):
    """A way to store the paged KV cache (see the module docstring for the layout and the contract).

    name: the registry name (`--kv-cache-dtype NAME`). Methods take the model dtype ("float16" or
    "float32"): the dtype of k, v, q and of what `read` returns.
    """

    name: str
    # True: the decoder stores K, V rotated by per-layer, per-kv-head orthonormal matrices the compiler
    # calibrates (model parameters kv_rotations.{layer}.key / .value; frontend/decoders/paged_attention.py)
    attention_rotations: ClassVar[bool] = False

    # ------------------------------------------------------------------ what is stored

    @abc.abstractmethod
    def cache_tensors(
        self, num_layers: int | str, kv_heads: int, page_size: int, head_dim: int, model_dtype: str
    ) -> list[CacheTensor]:
        """The tensors of the cache, in the compiled functions' order, each [L, "num_pages", 2, KVH, PS, ...]."""

    @abc.abstractmethod
    def code_bits(self, model_dtype: str) -> int:
        """Bits of one stored element (without the per-row metadata such as scales)."""

    def bytes_per_token(self, num_layers: int, kv_heads: int, head_dim: int, model_dtype: str) -> int:
        """Bytes one token's K and V take over all layers (scales included)."""
        tensors = self.cache_tensors(num_layers, kv_heads, 1, head_dim, model_dtype)
        return sum(t.bytes_per_page() for t in tensors)

    # ------------------------------------------------------------------ numpy reference

    @abc.abstractmethod
    def quantize(self, rows: np.ndarray, model_dtype: str) -> tuple[np.ndarray, ...]:
        """[T, D] rows (model dtype) -> the stored arrays of those rows, one per cache tensor, in
        `cache_tensors` order, each [T, *row_dims] (what the append kernel writes, bit for bit)."""

    @abc.abstractmethod
    def dequantize(self, stored: Sequence[np.ndarray], model_dtype: str) -> np.ndarray:
        """The stored arrays of T rows -> [T, D] in the model dtype (what `read` gives, bit for bit)."""

    # ------------------------------------------------------------------ TIR (tvm imported lazily)

    @abc.abstractmethod
    def append_func(self, kv_heads: int, head_dim: int, page_size: int, model_dtype: str) -> tirx.PrimFunc:
        """The append kernel's PrimFunc (module docstring: its params and its "append" block)."""

    @abc.abstractmethod
    def read(
        self,
        cache: Sequence[tirx.Buffer],
        layer: tirx.PrimExpr,
        page: tirx.PrimExpr,
        kv: int,
        head: tirx.PrimExpr,
        row: tirx.PrimExpr,
        d: tirx.PrimExpr,
        dtype: str,
    ) -> tirx.PrimExpr:
        """Element d of the stored row (layer, page, kv, head, row), dequantised to `dtype` (the model
        dtype; `cache` are the kernel's buffers in `cache_tensors` order)."""

    # ------------------------------------------------------------------ the kernels, for the frontend

    def append_kernel(self, kv_heads: int, head_dim: int, page_size: int, model_dtype: str) -> tirx.PrimFunc:
        """The kv_append kernel of this format (`schedules/kv_attention.kv_append_func`)."""
        from tensorpress.schedules.kv_attention import kv_append_func

        return kv_append_func(self, kv_heads, head_dim, page_size, model_dtype)

    def attention_kernel(
        self, heads: int, kv_heads: int, head_dim: int, page_size: int, model_dtype: str, phase: str
    ) -> tirx.PrimFunc:
        """The paged_attention kernel over this format (`schedules/kv_attention.paged_attention_func`)."""
        from tensorpress.schedules.kv_attention import paged_attention_func

        return paged_attention_func(self, heads, kv_heads, head_dim, page_size, model_dtype, phase)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def page_major_shape(num_layers: int | str, kv_heads: int, page_size: int, *row_dims: int) -> tuple[int | str, ...]:
    """[L, "num_pages", 2, KVH, PS, *row_dims]: the order every cache tensor keeps."""
    return (num_layers, NUM_PAGES, 2, kv_heads, page_size, *row_dims)
