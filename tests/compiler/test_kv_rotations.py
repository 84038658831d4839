"""int2-oscar's calibration (`compiler/calibration/kv_rotations.py`): RoPE as transformers applies it, the
query and attention-weighted value covariances against a torch computation written here (transformers'
RoPE, repeated kv heads, a causal softmax), prompts split across runs; and the bad inputs of `compile
--kv-cache-dtype int2-oscar` and `tensorpress calibrate`: one sentence, exit 1, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import tensorpress
from tensorpress.compiler.calibration.kv_rotations import AttentionCovariances, calibrate, rope, save_kv_rotations
from tensorpress.errors import ConfigError
from tensorpress.frontend.decoders.decoder_config import decoder_config_from_hf

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_llama"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from decoder_harness import hf_config  # noqa: E402


def _config():
    hf = hf_config("llama")  # 4 query heads over 2 kv heads, head_dim 16
    return hf, decoder_config_from_hf(hf.to_dict())


def _torch_rope(x: np.ndarray, hf) -> np.ndarray:
    """transformers' RoPE of x [n, heads, D] at positions 0..n-1."""
    emb = LlamaRotaryEmbedding(hf)
    t = torch.tensor(x, dtype=torch.float64).transpose(0, 1)[None]  # [1, heads, n, D]
    cos, sin = emb(t, torch.arange(x.shape[0])[None])
    out, _ = apply_rotary_pos_emb(t, t, cos.double(), sin.double())
    return out[0].transpose(0, 1).numpy()


def test_rope_is_transformers_rope():
    hf, config = _config()
    x = np.random.default_rng(0).standard_normal((9, 4, config.head_dim))
    np.testing.assert_allclose(rope(x, config.rope_inv_freq()), _torch_rope(x, hf), atol=1e-6)


def test_the_covariances_are_torchs_over_prompts_split_across_runs():
    hf, config = _config()
    rng = np.random.default_rng(1)
    hidden, D, H, KVH = config.hidden_size, config.head_dim, config.num_q_heads, config.num_kv_heads
    weights = {
        "q_proj.weight": rng.standard_normal((H * D, hidden)) * 0.2,
        "k_proj.weight": rng.standard_normal((KVH * D, hidden)) * 0.2,
        "v_proj.weight": rng.standard_normal((KVH * D, hidden)) * 0.2,
        "q_proj.bias": rng.standard_normal(H * D) * 0.1,
        "k_proj.bias": None,
        "v_proj.bias": rng.standard_normal(KVH * D) * 0.1,
    }
    lengths = [5, 11, 7]
    prompts = [rng.standard_normal((n, hidden)) for n in lengths]
    acc = AttentionCovariances(weights, config, lengths)
    acc.update(np.concatenate(prompts[:2]).astype(np.float32))  # two prompts in one run, one in the next
    acc.update(prompts[2].astype(np.float32))
    query = np.zeros((KVH, D, D))
    value = np.zeros((KVH, D, D))
    for x in prompts:
        x = x.astype(np.float32).astype(np.float64)
        n = len(x)
        q = _torch_rope((x @ weights["q_proj.weight"].T + weights["q_proj.bias"]).reshape(n, H, D), hf)
        k = _torch_rope((x @ weights["k_proj.weight"].T).reshape(n, KVH, D), hf)
        v = (x @ weights["v_proj.weight"].T + weights["v_proj.bias"]).reshape(n, KVH, D)
        qt, kt = torch.tensor(q).transpose(0, 1), torch.tensor(k).transpose(0, 1).repeat_interleave(H // KVH, 0)
        scores = qt @ kt.transpose(1, 2) / D**0.5  # [H, n, n]
        probs = torch.softmax(scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)
        received = probs.sum(dim=1).numpy()  # [H, t]
        for h in range(H):
            g = h // (H // KVH)
            query[g] += q[:, h].T @ q[:, h]
            value[g] += v[:, g].T @ (received[h][:, None] * v[:, g])
    # transformers makes cos and sin in float32: agreement to its rounding, not to float64's
    np.testing.assert_allclose(acc.query, query, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(acc.value, value, rtol=1e-4, atol=1e-4)
    key_rotation, value_rotation = acc.rotations()
    for r in (*key_rotation, *value_rotation):
        np.testing.assert_allclose(r.astype(np.float64) @ r.T, np.eye(D), atol=1e-6)


def tp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensorpress", *map(str, args)], capture_output=True, text=True)


def _error(result) -> str:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_int2_oscar_without_calibration_is_one_sentence_and_writes_nothing(tmp_path):
    out = tmp_path / "m.tpk"
    error = _error(tp("compile", DEMO, "--kv-cache-dtype", "int2-oscar", "-o", out))
    assert "int2-oscar needs calibration data" in error and not out.exists()


def test_calibrate_refuses_bad_inputs_in_one_sentence(tmp_path):
    (tmp_path / "prompts.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="must be an .npz of model inputs or a .txt"):
        calibrate(DEMO, tmp_path / "prompts.csv", tmp_path / "c.npz")
    (tmp_path / "p.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match="must be an .npz file"):
        calibrate(DEMO, tmp_path / "p.txt", tmp_path / "c")
    with pytest.raises(ConfigError, match="not a Hugging Face decoder folder"):
        calibrate(tmp_path, tmp_path / "p.txt", tmp_path / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "prompts.csv"]


def test_a_calibration_file_made_for_another_model_or_read_by_nothing_is_refused(tmp_path):
    eye = np.eye(32, dtype=np.float32)[None].repeat(2, 0)
    rotations = {f"kv_rotations.{i}.{kind}": eye for i in range(4) for kind in ("key", "value")}
    save_kv_rotations(tmp_path / "calib.npz", rotations, {"geometry": [4, 4, 2, 32], "digest": "0" * 32})
    out = tmp_path / "m.tpk"
    with pytest.raises(ConfigError, match="calibrated for another model"):
        tensorpress.compile(DEMO, out, kv_cache="int2-oscar", calibration=tmp_path / "calib.npz")
    with pytest.raises(ConfigError, match="read only by"):
        tensorpress.compile(DEMO, out, kv_cache="int4", calibration=tmp_path / "calib.npz")
    assert not out.exists()
