"""int2-oscar's rotations R_K, R_V per layer and kv head, from one calibration run of a decoder.

    rotations = calibrate_kv_rotations(imported, feeds, config)   # {"kv_rotations.{i}.key": [KVH, D, D], ...}
    save_kv_rotations("calib.npz", rotations, model_id)           # `tensorpress calibrate`
    load_kv_rotations("calib.npz", model_id)                      # what compile takes instead of prompts

The run (collect.py) hands each layer's attention input X [tokens, hidden] (after the input norm: what
q_proj, k_proj and v_proj read) to an accumulator, which computes in float64, prompt by prompt, q = RoPE(W_q X
+ b), k = RoPE(W_k X + b), v = W_v X + b at positions 0..n-1 and folds, per kv head g (its query heads h):

    Σ_q[g] = Σ_t Σ_h q_{t,h} q_{t,h}ᵀ                       (the logit error of a key error e is q·e)
    Σ_v[g] = Σ_t w_t v_t v_tᵀ,  w_t = Σ_h Σ_s p_h(s, t)     (p: the causal softmax of q_s·k_t/√D)

R = H · Uᵀ with U the eigenvectors of Σ (descending eigenvalue; each column's largest entry positive) and
H the normalised Sylvester Hadamard matrix: Uᵀ turns a row into its coordinates along the directions
attention weighs, H spreads each of them over every channel, so the per-token 2-bit grid loses no one
direction wholesale. OSCAR's paper composes the same two (row-vector form k · U_Q · H · P_br); its
bit-reversal permutation P_br spreads importance across quantisation groups along head_dim, and a
per-token group covering the whole head makes a permutation a no-op, so it is left out. Its value target
C_S appears (project page, read as text) to be VᵀSᵀSV, the covariance of the attention outputs; we weight
each value by the attention it receives (the issue's definition), which keeps memory at O(D²) per head: a
documented difference, not checked against their code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from tensorpress.errors import ConfigError, TensorpressError

MARKER = "tensorpress_kv_rotations"  # the calib.npz key that says what the file is and which model made it
_Q_PROJ = re.compile(r"^(.*layers\.(\d+)\.self_attn\.)q_proj\.weight$")


def hadamard(n: int) -> np.ndarray:
    """The normalised Sylvester Hadamard matrix [n, n] (orthonormal, symmetric); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"int2-oscar's Hadamard rotation needs head_dim a power of two, not {n}; use int2-kitty.")
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotation_from_covariance(covariance: np.ndarray) -> np.ndarray:
    """R = H · Uᵀ [D, D] (module docstring) of a symmetric covariance [D, D]."""
    eigenvalues, vectors = np.linalg.eigh(covariance)
    vectors = vectors[:, np.argsort(-eigenvalues, kind="stable")]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(len(vectors))])
    vectors = vectors * np.where(signs == 0, 1, signs)
    return hadamard(len(covariance)) @ vectors.T


def rope(x: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x [n, heads, D] at positions 0..n-1 (frontend/decoders/paged_attention.py)."""
    half = x.shape[-1] // 2
    angle = np.arange(len(x))[:, None] * np.asarray(inv_freq, np.float64)[None, :]
    cos, sin = (np.concatenate([f(angle)] * 2, axis=-1)[:, None, :] for f in (np.cos, np.sin))
    partner = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + partner * sin


class AttentionCovariances:
    """Σ_q and the attention-weighted Σ_v [KVH, D, D] of one layer (module docstring), folded from the
    layer's attention inputs of prompts of `lengths` tokens, in order (a run hands several at once)."""

    def __init__(self, projections: dict[str, np.ndarray | None], config: Any, lengths: list[int]):
        self.w = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in projections.items()}
        self.heads, self.kv_heads, self.head_dim = config.num_q_heads, config.num_kv_heads, config.head_dim
        self.inv_freq = config.rope_inv_freq() if config.position_encoding == "rope" else None
        self.lengths, self.next = list(lengths), 0
        self.query = np.zeros((self.kv_heads, self.head_dim, self.head_dim))
        self.value = np.zeros_like(self.query)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        start = 0
        while start < len(x):
            if self.next >= len(self.lengths):
                raise TensorpressError("the calibration run returned more tokens than its prompts hold.")
            n = self.lengths[self.next]
            self._fold(x[start : start + n])
            start, self.next = start + n, self.next + 1

    def _project(self, x: np.ndarray, name: str, heads: int) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T  # type: ignore[union-attr]
        bias = self.w.get(f"{name}.bias")
        return (y if bias is None else y + bias).reshape(len(x), heads, self.head_dim)

    def _fold(self, x: np.ndarray) -> None:
        q, k = self._project(x, "q_proj", self.heads), self._project(x, "k_proj", self.kv_heads)
        v = self._project(x, "v_proj", self.kv_heads)
        if self.inv_freq is not None:
            q, k = rope(q, self.inv_freq), rope(k, self.inv_freq)
        group = self.heads // self.kv_heads
        causal = np.tril(np.ones((len(x), len(x)), bool))
        for g in range(self.kv_heads):
            qg = q[:, g * group : (g + 1) * group]  # [n, group, D]
            self.query[g] += np.einsum("nhd,nhe->de", qg, qg)
            scores = np.einsum("shd,td->hst", qg, k[:, g]) / np.sqrt(self.head_dim)
            scores = np.where(causal, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            weight = p.sum(axis=(0, 1))  # [t]: the attention each value receives
            self.value[g] += (v[:, g].T * weight) @ v[:, g]

    def rotations(self) -> tuple[np.ndarray, np.ndarray]:
        """(R_K, R_V) [KVH, D, D] float32."""
        if self.next == 0:
            raise TensorpressError("the calibration run reached no attention layer; check the calibration prompts.")
        key = np.stack([rotation_from_covariance(c) for c in self.query])
        value = np.stack([rotation_from_covariance(c) for c in self.value])
        return key.astype(np.float32), value.astype(np.float32)


def attention_sites(params: dict[str, np.ndarray]) -> dict[int, str]:
    """{layer: the prefix of its attention's projections ("model.layers.3.self_attn.")}."""
    sites = {int(m.group(2)): m.group(1) for name in params if (m := _Q_PROJ.match(name))}
    return dict(sorted(sites.items()))


def calibrate_kv_rotations(imported: Any, feeds: list[dict[str, np.ndarray]], config: Any) -> dict[str, np.ndarray]:
    """{"kv_rotations.{layer}.key" / ".value": [KVH, D, D] float32} of a decoder imported with an unrotated
    KV format, from one run over its calibration prompts (`feeds`, {"input_ids": [n]} each)."""
    from tensorpress.compiler.calibration.collect import CalibrationRun

    sites = attention_sites(imported.params)
    if len(sites) != config.num_layers:
        raise TensorpressError(f"int2-oscar found {len(sites)} attention layers of {config.num_layers}.")
    hadamard(config.head_dim)  # a head_dim without a Hadamard matrix is refused before the run
    lengths = [len(feed["input_ids"]) for feed in feeds]
    accumulators = {}
    for prefix in sites.values():
        names = [f"{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj") for kind in ("weight", "bias")]
        projections = {name: imported.params.get(prefix + name) for name in names}
        accumulators[prefix + "q_proj.weight"] = AttentionCovariances(projections, config, lengths)
    CalibrationRun(imported, list(accumulators)).collect(feeds, accumulators)
    rotations = {}
    for layer, prefix in sites.items():
        rotations[f"kv_rotations.{layer}.key"], rotations[f"kv_rotations.{layer}.value"] = accumulators[
            prefix + "q_proj.weight"
        ].rotations()
    return rotations


def model_id(params: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
    """What identifies the model a calib.npz was made for: its attention geometry and a digest of its
    q/k/v projections (as fp16, so an fp32 and an fp16 compile of one checkpoint agree)."""
    digest = hashlib.sha256()
    for prefix in attention_sites(params).values():
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
            digest.update(np.ascontiguousarray(params[prefix + name], np.float16).tobytes())
    geometry = [config.num_layers, config.num_q_heads, config.num_kv_heads, config.head_dim]
    return {"geometry": geometry, "digest": digest.hexdigest()[:32]}


def is_kv_rotations_file(path: str | os.PathLike) -> bool:
    """Whether `path` is an .npz that `tensorpress calibrate` wrote (it holds the marker key)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return MARKER in npz.files
    except (OSError, ValueError):
        return False


def save_kv_rotations(path: str | os.PathLike, rotations: dict[str, np.ndarray], made_for: dict[str, Any]) -> None:
    """Write the rotations and the marker (the model's id, JSON) to `path`, through a temporary file."""
    from tensorpress.runtime.atomic_file import atomic_output

    arrays: dict[str, Any] = {MARKER: np.array(json.dumps(made_for)), **rotations}
    with atomic_output(path) as f:
        np.savez(f, **arrays)


def load_kv_rotations(path: str | os.PathLike, made_for: dict[str, Any]) -> dict[str, np.ndarray]:
    """The rotations of a calib.npz, refused in one sentence when it was made for another model."""
    with np.load(path, allow_pickle=False) as npz:
        written = json.loads(str(npz[MARKER]))
        rotations = {name: npz[name] for name in npz.files if name != MARKER}
    if written != made_for:
        raise ConfigError(
            f"{path} holds KV rotations calibrated for another model (its attention weights differ); run "
            "`tensorpress calibrate` on this model."
        )
    return rotations


def kv_rotations_for(model: Any, calibration: str | os.PathLike, dtype: str | None) -> dict[str, np.ndarray]:
    """The rotations a compile of the decoder folder `model` with int2-oscar stores: read from a calib.npz
    made for this model, or calibrated now from prompts (.txt, or .npz of input_ids)."""
    config, unrotated = import_unrotated(model, dtype)
    if is_kv_rotations_file(calibration):
        return load_kv_rotations(calibration, model_id(unrotated.params, config))
    return _calibrated(unrotated, calibration, config)


def import_unrotated(model: Any, dtype: str | None) -> tuple[Any, Any]:
    """(DecoderConfig, the decoder imported with a plain KV cache): what the calibration run runs."""
    from tensorpress.compiler.formats import get_kv_cache_format
    from tensorpress.frontend import import_model
    from tensorpress.frontend.hf_decoder import read_decoder_config

    return read_decoder_config(model), import_model(model, dtype=dtype, kv_cache=get_kv_cache_format("auto"))


def _calibrated(unrotated: Any, prompts: str | os.PathLike, config: Any) -> dict[str, np.ndarray]:
    from tensorpress.compiler.calibration.samples import calibration_feeds, read_calibration_file

    return calibrate_kv_rotations(unrotated, calibration_feeds(read_calibration_file(prompts), unrotated), config)


def calibrate(model: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None):
    """`tensorpress calibrate`: int2-oscar's rotations of the decoder folder `model`, calibrated on the
    prompts in `data` (.txt or .npz of input_ids), written to `output` (.npz) with the model's id, which
    `compile --calibration` checks. Returns the output path. Nothing is written on an error."""
    from tensorpress.compiler.calibration.samples import read_calibration_file
    from tensorpress.frontend.hf_decoder import is_hf_decoder_folder
    from tensorpress.runtime.atomic_file import check_destination

    if Path(output).suffix != ".npz":
        raise ConfigError(f"the calibration output {output} must be an .npz file, e.g. calib.npz.")
    check_destination(output, "calibration output", "calib.npz")
    if not Path(model, "config.json").is_file() or not is_hf_decoder_folder(model):
        raise ConfigError(f"{model} is not a Hugging Face decoder folder (Llama, Qwen2, OPT); calibrate one of them.")
    if is_kv_rotations_file(data):
        raise ConfigError(f"{data} is already a calibration output; give prompts (.txt, or .npz of input_ids).")
    read_calibration_file(data)  # a bad data file is refused before the model is imported
    config, unrotated = import_unrotated(model, dtype)
    save_kv_rotations(output, _calibrated(unrotated, data, config), model_id(unrotated.params, config))
    return Path(output)
