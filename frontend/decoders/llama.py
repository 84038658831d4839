"""Llama-family decoder (LlamaForCausalLM, Qwen2ForCausalLM): RMSNorm, RoPE, SwiGLU MLP, GQA.

Module attribute names follow transformers, so parameter names are the checkpoint's own
(`model.layers.0.self_attn.q_proj.weight`, ...). Qwen2 differs only by q/k/v biases (a knob).
Activations are [N, hidden]: the N tokens of a call, flattened across sequences.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tensorpress.frontend.decoders.causal_lm import CausalLM
from tensorpress.frontend.decoders.decoder_config import DecoderConfig
from tensorpress.frontend.decoders.paged_attention import PagedKV, apply_rope


class LlamaAttention(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.c = c
        q_out, kv_out = c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q_out, bias=c.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(c.hidden_size, kv_out, bias=c.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(c.hidden_size, kv_out, bias=c.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(q_out, c.hidden_size, bias=c.o_bias, dtype=dtype)
        self.inv_freq = c.rope_inv_freq()

    def forward(self, x: nn.Tensor, kv: PagedKV, layer: int) -> nn.Tensor:
        c, n = self.c, x.shape[0]
        q = op.reshape(self.q_proj(x), (n, c.num_q_heads, c.head_dim))
        k = op.reshape(self.k_proj(x), (n, c.num_kv_heads, c.head_dim))
        v = op.reshape(self.v_proj(x), (n, c.num_kv_heads, c.head_dim))
        q = apply_rope(q, kv.positions, self.inv_freq)
        k = apply_rope(k, kv.positions, self.inv_freq)
        out = kv.attend(layer, q, k, v)
        return self.o_proj(op.reshape(out, (n, c.num_q_heads * c.head_dim)))


class LlamaMLP(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str, index: int):
        self.index = index
        self.input_layernorm = nn.RMSNorm(c.hidden_size, -1, c.norm_eps, bias=False, dtype=dtype)
        self.self_attn = LlamaAttention(c, dtype)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, -1, c.norm_eps, bias=False, dtype=dtype)
        self.mlp = LlamaMLP(c, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([LlamaDecoderLayer(c, dtype, i) for i in range(c.num_layers)])
        self.norm = nn.RMSNorm(c.hidden_size, -1, c.norm_eps, bias=False, dtype=dtype)

    def forward(self, input_ids: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, kv)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    def __init__(self, c: DecoderConfig, dtype: str):
        if c.activation != "silu":
            raise ValueError(f"Llama-family MLP is SwiGLU (silu), got {c.activation}")
        self.config, self.dtype = c, dtype
        self.model = LlamaModel(c, dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, dtype=dtype)

    def hidden_states(self, input_ids: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        return self.model(input_ids, kv)

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:  # same pattern as nn.Linear, on the embedding table
            return op.matmul(hidden, op.permute_dims(self.model.embed_tokens.weight))
        return self.lm_head(hidden)
