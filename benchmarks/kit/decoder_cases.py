"""What the decoder part of the GPU kit builds and runs. Pure Python (no TVM, no torch): both sides read it.

Greedy equality (`decoder_greedy.py`): small random-init Llama / Qwen2 / OPT models and examples/tiny_llama
(dense fp16, and fp6 against transformers on the same fp6-rounded weights), compiled here, compared on
the GPU with transformers fp32 and fp16 loaded from the same Hugging Face folders.

Throughput (`benchmarks/decode_throughput_gpu.py`): a Llama-7B-shaped model (hidden 4096, 32 heads,
MLP 11008, vocab 32000) with random weights made on the GPU; the kit carries only the compiled library
(store_weights=False), transformers builds the same model from the carried config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECODERS_DIR = "decoders"  # inside the kit folder
SMALL_SEED = 0

# Small random-init configs (transformers keyword arguments): 2 layers, hidden 64, GQA where the family has it.
_TINY = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
SMALL_MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_TINY, intermediate_size=128, num_key_value_heads=2, eos_token_id=2)),
    "qwen2": ("Qwen2Config", dict(_TINY, intermediate_size=128, num_key_value_heads=2, eos_token_id=2)),
    "opt": ("OPTConfig", dict(_TINY, ffn_dim=128, word_embed_proj_dim=64, eos_token_id=2)),
}
TINY_LLAMA = "examples/tiny_llama"  # tracked in the repository: it travels with the working tree

GREEDY_NEW_TOKENS = 32
GREEDY_PROMPT_LENGTHS = (5, 17, 1, 33)  # single prompts: the first two; ragged batch: all four
GREEDY_PROMPT_SEED = 7
LOGITS_TOLERANCE = 2e-2  # fp16 weights and activations vs fp32: max |Δlogit| / max |logit|


@dataclass(frozen=True)
class GreedyCase:
    """One artifact checked against transformers: its HF folder (for transformers) and its weights."""

    name: str
    folder: str  # HF folder, relative to the repository root or the kit
    artifact: str  # relative to the kit
    weights: str  # "fp16" or "fp6"
    in_kit: bool  # folder inside the kit (else in the repository)

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass(frozen=True)
class ThroughputConfig:
    """The Llama-7B-shaped throughput run (dry mode: a small stand-in, meaningless numbers)."""

    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    layers: int = 32
    vocab: int = 32000
    batches: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (512, 2048)
    new_tokens: int = 64
    formats: tuple[str, ...] = ("fp16", "fp6")
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def hf_config(self) -> dict:
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(4096, max(self.contexts) + self.new_tokens),
            architectures=["LlamaForCausalLM"],
            torch_dtype="float16",
        )

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


LLAMA_7B_SHAPED = ThroughputConfig()
DRY_THROUGHPUT = ThroughputConfig(
    hidden=256, heads=4, kv_heads=4, intermediate=688, layers=2, vocab=1000, batches=(1, 4), contexts=(32, 64),
    new_tokens=4,
)  # fmt: skip
