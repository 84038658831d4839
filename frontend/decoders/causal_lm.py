"""The function set every decoder exports, shared by the families (llama.py, opt.py).

    prefill(input_ids[N], positions[N], seq_slot[N], block_table[B, M], last_token_index[B],
            *cache, *params) -> logits[B, vocab] float32
        N tokens of B sequences, flattened (ragged); appends their K/V to the pages and returns the
        logits of each sequence's token at `last_token_index[b]` (an index into the N tokens).
    decode(input_ids[B], positions[B], seq_slot[B], block_table[B, M],
           *cache, *params) -> logits[B, vocab] float32
        one token per live sequence (seq_slot is normally arange(B)).

    quantize_pages(src[K, G], dst[K], *cache, *params) -> the full-precision pages
        page-granular KV formats only (`compiler/formats/kv_page_quantised.py`): quantises the G
        full-precision pages src[k, :] into quantised page dst[k], every layer, in place.

`cache` are the KV-cache format's tensors in its order (the unquantised format: one,
kv_pages[L, P, 2, KVH, PS, D]; see `cache_tensors`). N, B, M and P are symbolic. The cache is
written in place (`call_tir_inplace`); the runtime owns it.
Params follow, in `named_parameters()` order, under their Hugging Face names.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tensorpress.frontend.decoders.decoder_config import DecoderConfig
from tensorpress.frontend.decoders.paged_attention import KVCacheKernels, PagedKV

PREFILL = "prefill"
DECODE = "decode"
QUANTIZE_PAGES = "quantize_pages"


class CausalLM(nn.Module):
    """Base of our decoder definitions: subclasses give `hidden_states` and `lm_logits`."""

    config: DecoderConfig
    dtype: str
    kv_cache: KVCacheKernels  # the compiler's choice of KV-cache format (set by the importer)
    kv_rotations: Any = None  # the per-layer KVRotation list, where the format asks for rotations

    def hidden_states(self, input_ids: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        """[N] token ids -> [N, hidden] final hidden states (after the final norm)."""
        raise NotImplementedError

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """[B, hidden] -> [B, vocab] in the model dtype."""
        raise NotImplementedError

    def prefill(self, input_ids, positions, seq_slot, block_table, last_token_index, *cache):
        kv = PagedKV(list(cache), positions, seq_slot, block_table, PREFILL, self.kv_cache, self.kv_rotations)
        hidden = self.hidden_states(input_ids, kv)
        last = op.take(hidden, last_token_index, axis=0)
        return op.astype(self.lm_logits(last), "float32")

    def decode(self, input_ids, positions, seq_slot, block_table, *cache):
        kv = PagedKV(list(cache), positions, seq_slot, block_table, DECODE, self.kv_cache, self.kv_rotations)
        return op.astype(self.lm_logits(self.hidden_states(input_ids, kv)), "float32")

    def quantize_pages(self, src, dst, *cache):
        c = self.config
        page_size = int(cache[0].shape[4])
        kernel = self.kv_cache.quantize_kernel(c.num_kv_heads, c.head_dim, page_size, self.dtype)  # type: ignore[attr-defined]
        written = [nn.Tensor.placeholder(t.shape, t.dtype) for t in cache]
        updated = op.tensor_ir_inplace_op(
            kernel, "kv_quantize_pages", [*cache, src, dst], inplace_indices=list(range(len(cache))), out=written
        )
        return updated[0]

    def quantizes_pages(self) -> bool:
        """Whether the KV format is page-granular (keeps recent pages full precision, quantises later)."""
        return hasattr(self.kv_cache, "quantize_kernel")

    def cache_tensors(self, page_size: int) -> list[Any]:
        """The KV-cache format's tensors (name, shape with "num_pages" symbolic, dtype) for this model."""
        c = self.config
        return self.kv_cache.cache_tensors(c.num_layers, c.num_kv_heads, page_size, c.head_dim, self.dtype)

    def export_spec(self, page_size: int) -> dict[str, nn.spec.MethodSpec]:
        """The `export_tvm` spec of prefill and decode (the cache tensors, then params as plain inputs)."""
        cache = {t.name: nn.spec.Tensor(list(t.shape), t.dtype) for t in self.cache_tensors(page_size)}
        i32 = "int32"
        inputs = {
            PREFILL: {
                "input_ids": nn.spec.Tensor(["n"], i32),
                "positions": nn.spec.Tensor(["n"], i32),
                "seq_slot": nn.spec.Tensor(["n"], i32),
                "block_table": nn.spec.Tensor(["b", "m"], i32),
                "last_token_index": nn.spec.Tensor(["b"], i32),
            },
            DECODE: {
                "input_ids": nn.spec.Tensor(["b"], i32),
                "positions": nn.spec.Tensor(["b"], i32),
                "seq_slot": nn.spec.Tensor(["b"], i32),
                "block_table": nn.spec.Tensor(["b", "m"], i32),
            },
        }
        if self.quantizes_pages():
            group = self.kv_cache.group_pages(page_size)  # type: ignore[attr-defined]
            inputs[QUANTIZE_PAGES] = {"src": nn.spec.Tensor(["k", group], i32), "dst": nn.spec.Tensor(["k"], i32)}
        specs = {}
        for name, fixed in inputs.items():
            args = {**fixed, **cache}  # the methods take the cache as *cache: their names come from here
            specs[name] = nn.spec.MethodSpec(
                getattr(self, name), list(args), list(args.values()), param_mode="plain", effect_mode="none"
            )
        return specs
