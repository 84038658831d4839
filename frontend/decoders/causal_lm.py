"""The function set every decoder exports, shared by the families (llama.py, opt.py).

    prefill(input_ids[N], positions[N], seq_slot[N], block_table[B, M], last_token_index[B],
            kv_pages[L, P, 2, KVH, PS, D], *params) -> logits[B, vocab] float32
        N tokens of B sequences, flattened (ragged); appends their K/V to the pages and returns the
        logits of each sequence's token at `last_token_index[b]` (an index into the N tokens).
    decode(input_ids[B], positions[B], seq_slot[B], block_table[B, M],
           kv_pages[L, P, 2, KVH, PS, D], *params) -> logits[B, vocab] float32
        one token per live sequence (seq_slot is normally arange(B)).

N, B, M and P are symbolic. kv_pages is written in place (`call_tir_inplace`); the runtime owns it.
Params follow, in `named_parameters()` order, under their Hugging Face names.
"""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tensorpress.frontend.decoders.config import DecoderConfig
from tensorpress.frontend.decoders.paged_attention import PagedKV

PREFILL = "prefill"
DECODE = "decode"


class CausalLM(nn.Module):
    """Base of our decoder definitions: subclasses give `hidden_states` and `lm_logits`."""

    config: DecoderConfig
    dtype: str

    def hidden_states(self, input_ids: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        """[N] token ids -> [N, hidden] final hidden states (after the final norm)."""
        raise NotImplementedError

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """[B, hidden] -> [B, vocab] in the model dtype."""
        raise NotImplementedError

    def prefill(self, input_ids, positions, seq_slot, block_table, last_token_index, kv_pages):
        kv = PagedKV(kv_pages, positions, seq_slot, block_table, PREFILL)
        hidden = self.hidden_states(input_ids, kv)
        last = op.take(hidden, last_token_index, axis=0)
        return op.astype(self.lm_logits(last), "float32")

    def decode(self, input_ids, positions, seq_slot, block_table, kv_pages):
        kv = PagedKV(kv_pages, positions, seq_slot, block_table, DECODE)
        return op.astype(self.lm_logits(self.hidden_states(input_ids, kv)), "float32")

    def cache_shape(self, page_size: int) -> list[int | str]:
        """Shape of kv_pages with the page count left symbolic ("num_pages")."""
        c = self.config
        return [c.num_layers, "num_pages", 2, c.num_kv_heads, page_size, c.head_dim]

    def export_spec(self, page_size: int) -> dict[str, Any]:
        """The `export_tvm` spec of prefill and decode (params as plain trailing inputs)."""
        pages = nn.spec.Tensor(self.cache_shape(page_size), self.dtype)
        i32 = "int32"
        mode = {"param_mode": "plain", "effect_mode": "none"}
        return {
            PREFILL: {
                "input_ids": nn.spec.Tensor(["n"], i32),
                "positions": nn.spec.Tensor(["n"], i32),
                "seq_slot": nn.spec.Tensor(["n"], i32),
                "block_table": nn.spec.Tensor(["b", "m"], i32),
                "last_token_index": nn.spec.Tensor(["b"], i32),
                "kv_pages": pages,
                "$": mode,
            },
            DECODE: {
                "input_ids": nn.spec.Tensor(["b"], i32),
                "positions": nn.spec.Tensor(["b"], i32),
                "seq_slot": nn.spec.Tensor(["b"], i32),
                "block_table": nn.spec.Tensor(["b", "m"], i32),
                "kv_pages": pages,
                "$": mode,
            },
        }
