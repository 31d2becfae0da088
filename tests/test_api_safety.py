"""The library's boundary: settings that cannot silently mean something else, a cache that refuses a new prompt while
it holds another, and a clear error for API misuse (issue #16)."""

from __future__ import annotations

import pytest
import torch

from echokv.cache import FullCache, echokv_attention
from echokv.codecs.mix import EchoKVCache
from echokv.generation import encode_prompt, generate, prefill
from echokv.models import ModelLoadError, cache_kwarg, check_device, load_model
from echokv.tiny import tiny_model
from helpers import train_tiny


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def trained(request):
    model = tiny_model(request.param)
    recon, _ = train_tiny(model, steps=0)
    return model, recon


@pytest.fixture(scope="module")
def llama():
    model = tiny_model()
    recon, _ = train_tiny(model, steps=0)
    return model, recon


# -- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "full", "switch_at_tokens": 10}, "switch_at_tokens sets when auto mode switches, but mode 'full'"),
        ({"mode": "compressed", "memory_budget_bytes": 10**6}, "memory_budget_bytes sets .* mode 'compressed'"),
        ({"switch_at_tokens": True}, "switch_at_tokens must be a positive integer, got True"),
        ({"memory_budget_bytes": 1.5e6}, "memory_budget_bytes must be a positive integer"),
        ({"mode": "full", "full_window": False}, "full_window must be a non-negative integer, got False"),
    ],
)
def test_settings_that_would_mean_something_else_are_refused(llama, kwargs, message):
    model, recon = llama
    with pytest.raises(ValueError, match=message):
        EchoKVCache(model, recon, **kwargs)


def test_a_switch_condition_means_auto_mode(llama):
    model, recon = llama
    assert EchoKVCache(model, recon, switch_at_tokens=5).mode == "auto"
    assert EchoKVCache(model, recon, memory_budget_bytes=10**6).mode == "auto"
    assert EchoKVCache(model, recon).mode == "full"
    import numpy as np

    assert EchoKVCache(model, recon, switch_at_tokens=np.int64(7)).switch_at_tokens == 7  # any integer


# -- API misuse: a sentence at the boundary, not an AttributeError from inside ------------------------------


def test_api_misuse_is_a_clear_error(llama, tmp_path):
    model, recon = llama
    with pytest.raises(TypeError, match="load_model needs a model name"):
        load_model(None)
    with pytest.raises(ModelLoadError, match="the model name is empty"):
        load_model("")
    with pytest.raises(TypeError, match="EchoKVCache needs an artifact"):
        EchoKVCache(model, None)
    with pytest.raises(TypeError, match="a cache needs the model it is used with"):
        EchoKVCache(None, recon)
    with pytest.raises(TypeError, match="a cache needs the model"):
        FullCache("smollm2-135m")
    with pytest.raises(TypeError, match="encode_prompt needs the model's tokenizer"):
        encode_prompt(None, "hi")
    cache = EchoKVCache(model, recon, mode="compressed")
    for ids, message in [
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
        (torch.zeros(0, 5, dtype=torch.long), "input_ids is empty"),
        (torch.tensor([3, 4, 5]), r"must be \[batch, tokens\], got shape \(3,\) \(add the batch dimension"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(model, ids, cache)
        with pytest.raises(ValueError, match=message):
            prefill(model, cache, ids)
    with pytest.raises(TypeError, match="input_ids must be a tensor of token ids"):
        generate(model, [[3, 4, 5]], cache)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, torch.ones(1, 3), cache)
    with pytest.raises(TypeError, match="generate needs the model"):
        generate(None, torch.ones(1, 3, dtype=torch.long), cache)
    with pytest.raises(TypeError, match="prefill needs a cache"):
        prefill(model, None, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(model, torch.ones(1, 3, dtype=torch.long), cache, max_new_tokens=0)
    assert cache.get_seq_length() == 0  # nothing was fed


def test_a_device_this_torch_cannot_use(monkeypatch):
    # issue #16: `--device cuda` on a CPU-only torch was an AssertionError traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="device 'cuda' cannot be used: .*--device cpu"):
        check_device("cuda")
    with pytest.raises(ModelLoadError, match="device 'cuda:1' cannot be used"):
        load_model("tiny-llama", device="cuda:1")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu'"):
        check_device("gpu")
    assert check_device("cpu").type == "cpu"


def test_model_folders_that_are_not_models(tmp_path, monkeypatch):
    # issue #16: a folder with only config.json blamed sentencepiece; `--model ""` loaded any .gguf in the
    # current folder; an artifact passed as --model
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="has config.json but no model weights"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_model(str(tmp_path))
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text('{"format": "echokv-artifact/1"}')
    with pytest.raises(ModelLoadError, match="is an echokv artifact, not a model: pass it as --artifact"):
        load_model(str(art))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")
    for name in ("", "  "):
        with pytest.raises(ModelLoadError, match="the model name is empty"):
            load_model(name)


def test_tiny_models_load_by_name_with_a_byte_tokenizer():
    model, tok = load_model("tiny-qwen2")
    ids = encode_prompt(tok, "hello")
    assert model.echokv_name == "tiny-qwen2" and int(ids.max()) < model.config.vocab_size
    with pytest.raises(ModelLoadError, match="unknown tiny model 'tiny-gpt2'"):
        load_model("tiny-gpt2")


# -- a cache reused across prompts ---------------------------------------------------------------------------


def _ids(n, seed):
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["full", "compressed"])
def test_generate_refuses_a_new_prompt_in_a_used_cache_and_continues_an_extension(trained, mode):
    # issue #16: a cache reused across prompts answered the previous prompt
    model, recon = trained
    a, b = _ids(20, 1), _ids(12, 2)
    cache = EchoKVCache(model, recon, mode=mode)
    first = generate(model, a, cache, max_new_tokens=4)
    for other in (b, _ids(40, 3), torch.cat([b, a], 1)):
        with pytest.raises(ValueError, match="already holds 23 tokens, and input_ids .* does not extend them.*reset"):
            generate(model, other, cache, max_new_tokens=3)
    assert cache.get_seq_length() == 23  # refused before anything was fed
    # the earlier prompt and answer followed by new text continue the cache
    turn = torch.cat([a, first, b], 1)
    out = generate(model, turn, cache, max_new_tokens=3)
    if mode == "full":
        assert torch.equal(out, generate(model, turn, EchoKVCache(model, recon, mode=mode), max_new_tokens=3))
    # reset: a new prompt, answered as by a new cache (and auto mode back in full mode)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.token_ids is None
    fresh = EchoKVCache(model, recon, mode=mode)
    assert torch.equal(generate(model, b, cache, max_new_tokens=3), generate(model, b, fresh, max_new_tokens=3))


def test_reset_puts_auto_mode_back_in_full_mode(llama):
    model, recon = llama
    cache = EchoKVCache(model, recon, switch_at_tokens=8)
    generate(model, _ids(12, 4), cache, max_new_tokens=2)
    assert cache.mode_now == "compressed"
    cache.reset()
    assert cache.mode_now == "full" and cache.switched_at is None and cache.nbytes() == 0


def test_a_forward_that_starts_inside_the_cache_is_refused(trained):
    # model(...) / model.generate(...) called directly: a call whose positions restart inside what the cache holds
    model, recon = trained
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        prefill(model, cache, _ids(30, 5), chunk_size=8)  # chunks continue: accepted
        model(input_ids=_ids(1, 6), use_cache=True, **cache_kwarg(model, cache))  # a decode step: accepted
        assert cache.get_seq_length() == 31
        with pytest.raises(ValueError, match="already holds 31 tokens, and the new input starts at position 0"):
            model(input_ids=_ids(5, 7), position_ids=torch.arange(5)[None], cache_position=torch.arange(5),
                  use_cache=True, **cache_kwarg(model, cache))
        # transformers' generate with a shorter new prompt: it feeds the tokens past the cache's length, at their
        # own positions (transformers 5.2 fails on its own before the cache is reached)
        if "cache" in cache_kwarg(model, cache):
            with pytest.raises(ValueError, match="a new prompt, not a continuation"):
                model.generate(_ids(26, 8), max_new_tokens=2, do_sample=False, **cache_kwarg(model, cache))
    assert cache.get_seq_length() == 31  # the refused calls stored nothing


# -- a cache knows its model (issue #29) ----------------------------------------------------------------------


@pytest.mark.parametrize("other", [
    {"arch": "llama", "num_hidden_layers": 2},  # fewer layers: nothing would ever be compressed
    {"arch": "llama", "num_hidden_layers": 6},  # more layers
    {"arch": "qwen2"},  # other heads or head size
    {"arch": "llama", "dtype": torch.bfloat16},
])
def test_a_cache_refuses_another_model_in_one_line(llama, other):
    model, recon = llama
    other = dict(other)
    wrong = tiny_model(other.pop("arch"), **other)
    ids = torch.randint(3, 250, (1, 12))
    for cache in (EchoKVCache(model, recon, mode="compressed"), FullCache(model)):
        for call in (lambda c: generate(wrong, ids, c, max_new_tokens=2), lambda c: prefill(wrong, c, ids)):
            with pytest.raises(ValueError, match=r"made for another model \(llama, 4 layers.*\) than the one it is "
                                                 r"used with \(.+\)") as err:
                call(cache)
            assert "\n" not in str(err.value)
    assert generate(model, ids, EchoKVCache(model, recon, mode="compressed"), max_new_tokens=2).shape == (1, 2)


@pytest.mark.parametrize("layers", [2, 6])
def test_model_generate_with_a_cache_of_another_model_is_refused_at_its_first_update(llama, layers):
    model, recon = llama
    wrong = tiny_model("llama", num_hidden_layers=layers)
    ids = torch.randint(3, 250, (1, 12))
    cache = EchoKVCache(model, recon, mode="compressed")
    with pytest.raises(ValueError, match="made for another model|fewer than 4 layers"):  # fewer: at the next call
        wrong.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       **cache_kwarg(wrong, cache))


def test_a_cache_left_by_an_interrupted_call_says_so_and_reset_mends_it(llama):
    model, _ = llama
    cache = FullCache(model)
    g = cache.geometry
    cache.update(torch.zeros(1, g.num_kv_heads, 3, g.head_dim), torch.zeros(1, g.num_kv_heads, 3, g.head_dim), 0)
    ids = torch.randint(3, 250, (1, 6))
    with pytest.raises(ValueError, match=r"stopped before its last layer.*interrupted call.*cache.reset\(\)"):
        model(ids, cache_position=torch.arange(3, 9), **cache_kwarg(model, cache))
    cache.reset()
    assert generate(model, ids, cache, max_new_tokens=2).shape == (1, 2)
