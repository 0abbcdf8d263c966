import hashlib
import json

import pytest
import torch

from irc.errors import UserError
from irc.models import load_model

from tolerances import FP32_REORDER


def test_loads_each_family_with_identical_logits(tiny_dir):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny_dir), dtype="fp32")
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        got = loaded.model(ids).logits
        want = reference(ids).logits
    assert torch.equal(got, want)
    assert loaded.dtype == torch.float32
    assert loaded.arch.family == tiny_dir.name
    assert loaded.tokenizer("Paris")["input_ids"]


def test_bf16_load(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama"]), dtype="bf16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_weights_sha256_is_of_the_weight_files(tiny_dirs):
    d = tiny_dirs["qwen2"]
    loaded = load_model(str(d), dtype="fp32")
    expected = hashlib.sha256(b"model.safetensors\0" + (d / "model.safetensors").read_bytes())
    assert loaded.weights_sha256 == expected.hexdigest()


def test_architecture_facts_match_config(tiny_dirs):
    arch = load_model(str(tiny_dirs["qwen3"]), dtype="fp32").arch
    assert (arch.n_layers, arch.hidden, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (2, 64, 4, 2, 16)
    assert (arch.intermediate, arch.vocab) == (128, 320)


def test_any_decoder_config_is_described(tmp_path):
    # support is decided by the routing pass on the graph (tests/passes/test_families.py),
    # not by a list of families: loading describes any decoder transformers provides
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    arch = load_model(str(tmp_path), dtype="fp32").arch
    assert (arch.family, arch.n_layers, arch.hidden, arch.intermediate) == ("gpt2", 1, 32, 128)
    assert arch.mlp_flops() == 2 * 2 * 32 * 128  # a plain MLP: up and down


def test_bad_dtype(tiny_dirs):
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        load_model(str(tiny_dirs["llama"]), dtype="int8")


def test_directory_without_weights(tiny_dirs, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    json.loads((tmp_path / "config.json").read_text())
    from irc.models.loading import source_weights_sha256
    from irc.models.sources import resolve_source

    with pytest.raises(UserError, match="holds no weights"):
        source_weights_sha256(resolve_source(str(tmp_path)))


def test_tolerance_module_is_sane():
    assert 0 < FP32_REORDER < 1e-3
