"""OPT decoder (OPTForCausalLM): LayerNorm, learned positions (offset 2), ReLU fc1/fc2 MLP, MHA.

Module attribute names follow transformers (`model.decoder.layers.0.self_attn.out_proj.weight`, ...).
Quirks kept as knobs: the position table starts at index 2, narrow embeddings go through
project_in/project_out (OPT-350m), layer norms after the residual when `norm_before` is false, and
the LM head is tied to the embedding table. transformers scales q by 1/sqrt(D) after q_proj; our
attention kernel applies the same scale to q inside the kernel.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tensorpress.frontend.decoders.causal_lm import CausalLM
from tensorpress.frontend.decoders.decoder_config import DecoderConfig
from tensorpress.frontend.decoders.paged_attention import PagedKV


def _activation(name: str, x: nn.Tensor) -> nn.Tensor:
    return op.relu(x) if name == "relu" else op.gelu(x)


class OPTAttention(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.c = c
        h = c.hidden_size
        self.k_proj = nn.Linear(h, h, bias=c.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(h, h, bias=c.qkv_bias, dtype=dtype)
        self.q_proj = nn.Linear(h, h, bias=c.qkv_bias, dtype=dtype)
        self.out_proj = nn.Linear(h, h, bias=c.o_bias, dtype=dtype)

    def forward(self, x: nn.Tensor, kv: PagedKV, layer: int) -> nn.Tensor:
        c, n = self.c, x.shape[0]
        q = op.reshape(self.q_proj(x), (n, c.num_q_heads, c.head_dim))
        k = op.reshape(self.k_proj(x), (n, c.num_kv_heads, c.head_dim))
        v = op.reshape(self.v_proj(x), (n, c.num_kv_heads, c.head_dim))
        out = kv.attend(layer, q, k, v)
        return self.out_proj(op.reshape(out, (n, c.hidden_size)))


class OPTDecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str, index: int):
        self.c, self.index = c, index
        self.self_attn = OPTAttention(c, dtype)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size, c.norm_eps, dtype=dtype)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, c.norm_eps, dtype=dtype)

    def forward(self, x: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        before = self.c.norm_before
        h = self.self_attn(self.self_attn_layer_norm(x) if before else x, kv, self.index)
        x = x + h
        if not before:
            x = self.self_attn_layer_norm(x)
        h = self.fc2(_activation(self.c.activation, self.fc1(self.final_layer_norm(x) if before else x)))
        x = x + h
        return x if before else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.c = c
        proj = c.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(c.vocab_size, proj, dtype=dtype)
        positions = c.max_position_embeddings + c.learned_position_offset
        self.embed_positions = nn.Embedding(positions, c.hidden_size, dtype=dtype)
        if c.final_norm:
            self.final_layer_norm = nn.LayerNorm(c.hidden_size, c.norm_eps, dtype=dtype)
        if proj != c.hidden_size:
            self.project_out = nn.Linear(c.hidden_size, proj, bias=False, dtype=dtype)
            self.project_in = nn.Linear(proj, c.hidden_size, bias=False, dtype=dtype)
        self.layers = nn.ModuleList([OPTDecoderLayer(c, dtype, i) for i in range(c.num_layers)])

    def forward(self, input_ids: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        c = self.c
        x = self.embed_tokens(input_ids)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(kv.positions + c.learned_position_offset)
        for layer in self.layers:
            x = layer(x, kv)
        if c.final_norm:
            x = self.final_layer_norm(x)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.decoder = OPTDecoder(c, dtype)


class OPTForCausalLM(CausalLM):
    def __init__(self, c: DecoderConfig, dtype: str):
        self.config, self.dtype = c, dtype
        self.model = OPTModel(c, dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.word_embed_proj_dim, c.vocab_size, bias=False, dtype=dtype)

    def hidden_states(self, input_ids: nn.Tensor, kv: PagedKV) -> nn.Tensor:
        return self.model.decoder(input_ids, kv)

    def lm_logits(self, hidden: nn.Tensor) -> nn.Tensor:
        if self.config.tie_word_embeddings:  # same pattern as nn.Linear, on the embedding table
            return op.matmul(hidden, op.permute_dims(self.model.decoder.embed_tokens.weight))
        return self.lm_head(hidden)
