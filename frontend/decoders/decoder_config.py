"""What our decoder definitions need to know about a Hugging Face causal LM, read from config.json.

`DecoderConfig` is the one place where a family's quirks become plain knobs (norm kind, position
encoding, activation, biases, OPT's position offset, ...). It is stored in the artifact manifest, so
the runtime knows the model's geometry without the compiler.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tensorpress.errors import ModelImportError

# architectures[0] of config.json -> family of our definitions (frontend/decoders/<family>.py)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}

_CAUSAL_LM_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}


@dataclass(frozen=True)
class DecoderConfig:
    """Geometry and per-family knobs of a decoder-only transformer (sizes in elements)."""

    architecture: str  # as in config.json, e.g. "LlamaForCausalLM"
    family: str  # "llama" (Llama, Qwen2) or "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str  # "rms" or "layer"
    norm_eps: float
    activation: str  # "silu" (SwiGLU MLP) or "relu"/"gelu" (fc1/fc2 MLP)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    position_encoding: str  # "rope" or "learned"
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "linear"/"llama3", ...}
    learned_position_offset: int = 0  # OPT: its position table starts at index 2
    word_embed_proj_dim: int = 0  # OPT: embeddings narrower than hidden (project_in/out) when != hidden
    norm_before: bool = True  # OPT-350m applies layer norms after attention/MLP
    final_norm: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DecoderConfig:
        return DecoderConfig(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ()))})

    def context_length(self) -> int:
        """Positions the model was made for: max_position_embeddings, or more where RoPE scaling
        extends it (linear / llama3 scaling by `factor` of original_max_position_embeddings, or of
        max_position_embeddings when the config gives no original length)."""
        scaling = self.rope_scaling or {}
        if self.position_encoding != "rope" or "factor" not in scaling:
            return self.max_position_embeddings
        original = int(scaling.get("original_max_position_embeddings") or self.max_position_embeddings)
        return max(self.max_position_embeddings, int(original * float(scaling["factor"])))

    def rope_inv_freq(self) -> np.ndarray:
        """[head_dim/2] float32 inverse frequencies of RoPE, with the config's scaling applied."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old_len = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            inv_freq = np.where(medium, smoothed, scaled)
        return inv_freq.astype(np.float32)


def _eos_ids(hf: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes `rope_parameters`; older folders have `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ModelImportError(f"{where}: RoPE type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)}).")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelImportError(f"{where}: partial RoPE (partial_rotary_factor < 1) are unsupported.")
    if kind == "default":
        return theta, None
    scaling.pop("rope_theta", None)
    scaling["rope_type"] = kind
    return theta, scaling


def _activation(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise ModelImportError(
            f"{where}: activation {name!r} is not supported (supported: {', '.join(sorted(_ACTIVATIONS))})."
        )
    return _ACTIVATIONS[name]


def decoder_config_from_hf(
    hf: dict[str, Any], generation: dict[str, Any] | None = None, where: str = "config.json"
) -> DecoderConfig:
    """Map a config.json dict (and generation_config.json, for eos ids) to a `DecoderConfig`.

    Raises ModelImportError naming the architecture when it is not one we define.
    """
    generation = generation or {}
    archs = hf.get("architectures") or []
    # configs without `architectures` (built in code, never saved by a model) name only the model type
    arch = (
        archs[0]
        if archs
        else _CAUSAL_LM_OF_MODEL_TYPE.get(str(hf.get("model_type")), f"<model_type {hf.get('model_type')!r}>")
    )
    family = SUPPORTED_ARCHITECTURES.get(arch)
    if family is None:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelImportError(f"{where}: architecture {arch} is not a supported decoder (supported: {supported}).")
    common: dict[str, Any] = {
        "architecture": arch,
        "family": family,
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_q_heads": int(hf["num_attention_heads"]),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "bos_token_id": generation.get("bos_token_id", hf.get("bos_token_id")),
        "eos_token_ids": _eos_ids(hf, generation),
    }
    if family == "llama":
        theta, scaling = _rope(hf, where)
        if hf.get("use_sliding_window"):
            raise ModelImportError(f"{where}: sliding-window attention (use_sliding_window) is unsupported.")
        qkv_bias = arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False))
        return DecoderConfig(
            **common,
            intermediate_size=int(hf["intermediate_size"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            norm="rms",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            activation=_activation(hf.get("hidden_act", "silu"), where),
            qkv_bias=qkv_bias,
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            position_encoding="rope",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
        )
    # OPT
    bias = bool(hf.get("enable_bias", True))
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ModelImportError(
            f"{where}: OPT without layer-norm weights (layer_norm_elementwise_affine=false) is unsupported."
        )
    norm_before = bool(hf.get("do_layer_norm_before", True))
    return DecoderConfig(
        **common,
        intermediate_size=int(hf["ffn_dim"]),
        num_kv_heads=int(hf["num_attention_heads"]),
        head_dim=int(hf["hidden_size"]) // int(hf["num_attention_heads"]),
        norm="layer",
        norm_eps=1e-5,
        activation=_activation(hf.get("activation_function", "relu"), where),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        position_encoding="learned",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        learned_position_offset=2,
        word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hf["hidden_size"]),
        norm_before=norm_before,
        final_norm=norm_before and not hf.get("_remove_final_layer_norm", False),
    )
