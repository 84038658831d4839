"""Importing Hugging Face decoder folders: names, parameter order, the linear-layer pattern the compiler
rewrites, the manifest section, dtypes (bf16 checkpoints) and the errors people see."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf

from tensorpress.compiler.formats import get_kv_cache_format
from tensorpress.compiler.passes.rewrite_linear_to_weight_gemm import find_linear_sites
from tensorpress.errors import ModelImportError
from tensorpress.frontend.hf_decoder import SUPPORTED_ARCHITECTURES, import_hf_decoder, is_hf_decoder_folder

KV = get_kv_cache_format("auto")  # the compiler's default KV-cache format: the model's dtype

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**TINY, intermediate_size=64, num_key_value_heads=2)
    return _save(tf.LlamaForCausalLM(config), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.OPTConfig(**TINY, ffn_dim=64, word_embed_proj_dim=32)
    return _save(tf.OPTForCausalLM(config), tmp_path_factory.mktemp("opt"))


def test_weights_keep_their_hf_names_in_the_functions_parameter_order(llama_folder):
    imported = import_hf_decoder(llama_folder, kv_cache=KV)
    state = tf.LlamaForCausalLM.from_pretrained(llama_folder).state_dict()
    assert set(imported.params) == set(state)
    for name, value in imported.params.items():
        np.testing.assert_array_equal(value, state[name].numpy())
    for function in ("prefill", "decode"):
        func = imported.mod[function]
        num_input = int(func.attrs["num_input"])
        assert [v.name for v in func.params[num_input:]] == list(imported.params)
    assert imported.kind == "decoder"


def _linear_weights(mod) -> set[str]:
    return {site.weight for site in find_linear_sites(mod)}


def test_every_linear_layer_is_matmul_of_a_permuted_weight_parameter(llama_folder, opt_folder):
    llama = import_hf_decoder(llama_folder, kv_cache=KV)
    expected = {n for n in llama.params if n.endswith("proj.weight")} | {"lm_head.weight"}
    assert len(expected) == 2 * 7 + 1
    assert _linear_weights(llama.mod) == expected
    # OPT: q/k/v/out_proj + fc1/fc2 with biases; the LM head is the tied embedding table
    opt = import_hf_decoder(opt_folder, kv_cache=KV)
    expected = {n for n in opt.params if n.endswith("weight") and ("proj" in n or ".fc" in n)}
    assert len(expected) == 2 * 6
    assert _linear_weights(opt.mod) == expected | {"model.decoder.embed_tokens.weight"}
    assert "lm_head.weight" not in opt.params


def test_manifest_section_says_what_the_runtime_needs(llama_folder):
    imported = import_hf_decoder(llama_folder, page_size=8, kv_cache=KV)
    section = imported.info["decoder"]
    assert section["cache_tensors"] == [{"name": "kv_pages", "shape": [2, "num_pages", 2, 2, 8, 8], "dtype": "float32"}]
    assert section["functions"] == {"prefill": "prefill", "decode": "decode"}
    assert section["config"]["architecture"] == "LlamaForCausalLM"
    assert section["max_sequence_length"] is None  # RoPE: no table to run off
    assert section["context_length"] == TINY["max_position_embeddings"]  # the runtime's limit
    assert section["tokenizer"] is None and imported.info["extra_files"] == {}
    json.dumps(section)  # it goes into manifest.json as it is


def test_opt_sequence_length_is_bounded_by_its_position_table(opt_folder):
    section = import_hf_decoder(opt_folder, kv_cache=KV).info["decoder"]
    assert section["max_sequence_length"] == TINY["max_position_embeddings"]


def test_bf16_checkpoints_are_widened_exactly(tmp_path):
    torch.manual_seed(1)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, intermediate_size=64)).to(torch.bfloat16)
    folder = _save(model, tmp_path)
    imported = import_hf_decoder(folder, dtype="float32", kv_cache=KV)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(imported.params[name], value.float().numpy())
    assert import_hf_decoder(folder, kv_cache=KV).info["decoder"]["dtype"] == "float16"  # default for bf16/fp16 files


def test_unknown_architecture_is_named_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 8}))
    assert not is_hf_decoder_folder(tmp_path)
    with pytest.raises(ModelImportError, match="GPT2LMHeadModel") as err:
        import_hf_decoder(tmp_path, kv_cache=KV)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)


def test_missing_or_misshapen_weights_are_named(tmp_path, llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    (tmp_path / "model.safetensors").write_bytes((llama_folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelImportError, match=r"mlp\.\w+_proj\.weight has shape"):
        import_hf_decoder(tmp_path, kv_cache=KV)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelImportError, match="no \\*.safetensors"):
        import_hf_decoder(tmp_path, kv_cache=KV)


def test_unsupported_rope_scaling_is_refused(tmp_path, llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="yarn"):
        import_hf_decoder(tmp_path, kv_cache=KV)
