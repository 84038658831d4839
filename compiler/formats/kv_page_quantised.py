"""Page-granular KV formats: recent tokens full precision, whole pages quantised once they are old.

A per-row format (int8, int4) quantises each token's row as it is appended. A page-granular format
(int2-kitty; int2-oscar next) cannot: its keys are quantised per channel over a whole page, so a page is
quantised once, when it leaves the recent window. Its cache is two pools of pages:

    kv_pages [L, "num_pages", 2, KVH, PS, D]     model dtype: the sink, the recent window, the page
                                                 being filled; what append writes (runtime pages of PS)
    <format's quantised tensors>[L, "num_quantised_pages", ...]
                                                 one quantised page holds QP = G · PS tokens (the format's
                                                 group, e.g. Kitty's 128): G runtime pages quantised at once

A sequence's block table holds tagged entries: e >= 0 is full-precision page e; e < 0 is runtime page
(sub) of quantised page q, where -1 - e = q · G + sub (sub = 0..G-1, in position order). So

    sequence (PS = 16, G = 2, sink 1 page, window 2 pages), length 90:
        table   [ 7 | -1 | -2 | -3 | -4 | 3 | 9 | 4 ]
        pages     fp  q0s0 q0s1 q1s0 q1s1  fp  fp  fp
        tokens   0-15 16-47      48-79     80-89 (+ the window; page 4 is being filled)

The attention keeps its one page read (`read`): it branches on the entry's sign (both sides clamped in
bounds, so a select is as safe as a branch) and never knows the format. What the runtime does (it never
knows the format either; the manifest's "page_quantisation" section says sink, window and G):
- append writes only full-precision pages (the newest tokens are never in a quantised page);
- after each prefill and decode call, every group of G consecutive full-precision pages past the sink
  whose tokens all lie before the window is quantised by one compiled call, `quantize_pages(src[K, G],
  dst[K], *cache)` over all layers, the fp pages go back to their pool and the entries are retagged;
- a finished sequence gives both kinds of pages back.

A subclass gives the quantised tensors, the numpy page reference, the TIR of the quantise kernel and of
one dequantised element (`quantised_tensors`, `quantize_page`, `dequantize_page`, `quantize_pages_func`,
`read_quantised`). Plain Python: TVM is imported lazily.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tensorpress.compiler.formats.kv_cache import CacheTensor, KVCacheFormat, page_major_shape
from tensorpress.compiler.formats.kv_model_dtype import ModelDtypeKVCache
from tensorpress.errors import ConfigError

if TYPE_CHECKING:
    from tvm import tirx

NUM_QUANTISED_PAGES = "num_quantised_pages"  # the quantised pool's symbolic page count
QUANTIZE_KERNEL = "kv_quantize_pages"


@dataclass(frozen=True)
class PageQuantisation:
    """The runtime's side of a page-granular format (the manifest's "page_quantisation")."""

    sink_tokens: int
    window_tokens: int
    group_pages: int  # G: runtime pages per quantised page
    full_precision_bytes_per_token: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "sink_tokens": self.sink_tokens,
            "window_tokens": self.window_tokens,
            "group_pages": self.group_pages,
            "full_precision_bytes_per_token": self.full_precision_bytes_per_token,
        }


class PageQuantisedKVFormat(KVCacheFormat):
    """A KV format that keeps recent pages full precision and quantises groups of pages later.

    Subclasses set `sink`, `window` (tokens kept full precision at the start and the end of a sequence)
    and `page_tokens` (QP, tokens of one quantised page) and give the abstract methods below.
    """

    sink: int
    window: int
    page_tokens: int

    # ------------------------------------------------------------------ what a subclass gives

    @abc.abstractmethod
    def quantised_tensors(
        self, num_layers: int | str, kv_heads: int, head_dim: int, model_dtype: str
    ) -> list[CacheTensor]:
        """The quantised pool's tensors, each [L, "num_quantised_pages", ...] (QP tokens a page)."""

    @abc.abstractmethod
    def quantised_code_bits(self) -> int:
        """Bits of one stored element of a quantised page (metadata excluded)."""

    @abc.abstractmethod
    def quantize_page(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
        """The numpy reference: keys, values [QP, D] of one kv head -> that head's slice of each
        quantised tensor (in `quantised_tensors` order, layer and page axes dropped), bit for bit what
        the quantise kernel writes."""

    @abc.abstractmethod
    def dequantize_page(self, stored: Sequence[np.ndarray], model_dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """The inverse: one kv head's slices -> (keys, values) [QP, D] in the model dtype, bit for bit
        what `read_quantised` gives."""

    @abc.abstractmethod
    def quantize_pages_func(self, kv_heads: int, head_dim: int, page_size: int, model_dtype: str) -> tirx.PrimFunc:
        """The kv_quantize_pages PrimFunc: params (*cache tensors, src[K, G] int32, dst[K] int32): for every
        layer and kv head, quantise the QP tokens of the fp pages src[k, 0..G-1] into quantised page dst[k]."""

    @abc.abstractmethod
    def read_quantised(
        self, quantised: Sequence[tirx.Buffer], layer, page, kv: int, head, row, d, dtype: str
    ) -> tirx.PrimExpr:
        """Element d of row `row` (0..QP-1) of quantised page `page`, dequantised to `dtype`."""

    # ------------------------------------------------------------------ the KV format contract

    def group_pages(self, page_size: int) -> int:
        """G = QP / PS runtime pages per quantised page; refused unless whole."""
        if self.page_tokens % page_size:
            raise ConfigError(
                f"{self.name}: quantised pages of {self.page_tokens} tokens must be whole runtime pages of "
                f"{page_size} tokens; choose a page size that divides {self.page_tokens}."
            )
        return self.page_tokens // page_size

    def full_precision(self) -> ModelDtypeKVCache:
        return ModelDtypeKVCache("auto", None)

    def cache_tensors(self, num_layers, kv_heads, page_size, head_dim, model_dtype) -> list[CacheTensor]:
        self.group_pages(page_size)
        pages = CacheTensor("kv_pages", page_major_shape(num_layers, kv_heads, page_size, head_dim), model_dtype)
        return [pages, *self.quantised_tensors(num_layers, kv_heads, head_dim, model_dtype)]

    def code_bits(self, model_dtype: str) -> int:
        return self.quantised_code_bits()

    def bytes_per_token(self, num_layers: int, kv_heads: int, head_dim: int, model_dtype: str) -> int:
        """Bytes one token takes in the quantised pool (metadata included; sink and window excluded)."""
        tensors = self.quantised_tensors(num_layers, kv_heads, head_dim, model_dtype)
        return math.ceil(sum(t.bytes_per_page() for t in tensors) / self.page_tokens)

    def page_quantisation(
        self, num_layers: int, kv_heads: int, head_dim: int, page_size: int, model_dtype: str
    ) -> PageQuantisation:
        fp = self.full_precision().bytes_per_token(num_layers, kv_heads, head_dim, model_dtype)
        return PageQuantisation(self.sink, self.window, self.group_pages(page_size), fp)

    def quantize(self, rows: np.ndarray, model_dtype: str) -> tuple[np.ndarray, ...]:
        raise NotImplementedError(f"{self.name} quantises whole pages: use quantize_page")

    def dequantize(self, stored: Sequence[np.ndarray], model_dtype: str) -> np.ndarray:
        raise NotImplementedError(f"{self.name} quantises whole pages: use dequantize_page")

    def append_func(self, kv_heads, head_dim, page_size, model_dtype):
        """The full-precision append into kv_pages; the quantised tensors ride along unused."""
        from tvm import tirx

        plain = self.full_precision().append_func(kv_heads, head_dim, page_size, model_dtype)
        extra = _symbolic_buffers(self.quantised_tensors("num_layers", kv_heads, head_dim, model_dtype))
        params = [plain.params[0], *extra, *plain.params[1:]]
        return tirx.PrimFunc(params, plain.body, plain.ret_type, plain.attrs)

    def read(self, cache, layer, page, kv, head, row, d, dtype):
        """Full-precision page `page` when the entry is >= 0, else row (sub · PS + row) of quantised
        page q, -1 - page = q · G + sub (module docstring). Both indices clamped in bounds."""
        from tvm import tirx

        pages, *quantised = cache
        page_size = pages.shape[4]
        group = self.page_tokens // int(page_size)
        page = tirx.Cast("int64", page)
        fp_value = pages[layer, tirx.max(page, 0), kv, head, row, d].astype(dtype)
        tagged = tirx.max(-1 - page, 0)
        q_row = tirx.floormod(tagged, group) * page_size + row
        q_value = self.read_quantised(quantised, layer, tirx.floordiv(tagged, group), kv, head, q_row, d, dtype)
        return tirx.if_then_else(page >= 0, fp_value, q_value)

    def quantize_kernel(self, kv_heads: int, head_dim: int, page_size: int, model_dtype: str) -> tirx.PrimFunc:
        """The kv_quantize_pages kernel, marked for the schedules (`schedules/kv_attention.py`)."""
        from tensorpress.schedules.kv_attention import kv_quantize_pages_func

        return kv_quantize_pages_func(self, kv_heads, head_dim, page_size, model_dtype)


def _symbolic_buffers(tensors: list[CacheTensor]) -> list[tirx.Buffer]:
    """Buffers of `tensors` with their layer and page counts symbolic."""
    from tvm import tirx

    dims = {"num_layers": tirx.Var("L", "int64"), NUM_QUANTISED_PAGES: tirx.Var("Q", "int64")}
    shapes = [[dims[d] if isinstance(d, str) else tirx.IntImm("int64", d) for d in t.shape] for t in tensors]
    return [tirx.decl_buffer(s, t.dtype, t.name) for s, t in zip(shapes, tensors)]
