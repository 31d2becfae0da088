"""The fast compressed decode path gives the same outputs as the explicit reconstruction; it runs only inside
the echokv attention scope, and building a cache or generating leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from echokv import attention
from echokv.cache import echokv_attention
from echokv.codecs.mix import EchoKVCache
from echokv.generation import generate
from echokv.tiny import tiny_model
from helpers import train_tiny


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def trained(request):
    model = tiny_model(request.param)
    # the RoPE-commuting heads, which store floats: two free-running caches of a quantizing network drift apart by
    # code flips (tests/test_decode_paths.py compares the default network's paths step by step)
    recon, _ = train_tiny(model, steps=3, variant="heads")
    return model, recon


def _chunked_logits(model, recon, ids, mask, chunk, fast, **kw):
    cache = EchoKVCache(model, recon, fast=fast, **kw)
    out = []
    with echokv_attention(model):
        for s in range(0, ids.shape[1], chunk):
            out.append(model(ids[:, s : s + chunk], attention_mask=mask[:, : s + chunk], past_key_values=cache).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("length, chunk", [(9, 3), (40, 7), (70, 1), (70, 24)])  # 24: explicit prefill chunks
def test_fast_equals_explicit_for_several_lengths(trained, length, chunk):
    model, recon = trained
    ids = torch.randint(3, 250, (1, length))
    mask = torch.ones_like(ids)
    ref = _chunked_logits(model, recon, ids, mask, chunk, fast=False, mode="compressed")
    out = _chunked_logits(model, recon, ids, mask, chunk, fast=True, mode="compressed")
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_fast_equals_explicit_batch_with_padding(trained):
    model, recon = trained
    ids = torch.randint(3, 250, (2, 30))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    ref = _chunked_logits(model, recon, ids, mask, 7, fast=False, mode="compressed")
    out = _chunked_logits(model, recon, ids, mask, 7, fast=True, mode="compressed")
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-4)
    with echokv_attention(model):
        gen = [
            model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                           past_key_values=EchoKVCache(model, recon, mode="compressed", fast=fast))
            for fast in (False, True)
        ]
    assert torch.equal(gen[0], gen[1])


def test_fast_equals_explicit_after_a_mid_sequence_switch_and_with_a_window(trained):
    model, recon = trained
    ids = torch.randint(3, 250, (1, 12))
    with echokv_attention(model):
        outs = [
            model.generate(ids, max_new_tokens=20, do_sample=False,
                           past_key_values=EchoKVCache(model, recon, switch_at_tokens=20, full_window=4, fast=fast))
            for fast in (False, True)
        ]
    assert torch.equal(outs[0], outs[1])


def _attention_settings(model) -> list:
    return [cfg._attn_implementation for cfg in attention._configs(model)]


def _fast_calls(monkeypatch) -> list[int]:
    """Record the layers whose attention the fast path computed."""
    calls, real = [], attention.hand_off

    def spy(layer_idx, fn):
        calls.append(layer_idx)
        real(layer_idx, fn)

    monkeypatch.setattr(attention, "hand_off", spy)
    return calls


def test_the_fast_path_runs_only_inside_the_scope(trained, monkeypatch):
    model, recon = trained
    calls = _fast_calls(monkeypatch)
    ids = torch.randint(3, 250, (1, 12))
    mask = torch.ones_like(ids)
    explicit = _chunked_logits(model, recon, ids, mask, 3, fast=False, mode="compressed")
    assert not calls
    inside = _chunked_logits(model, recon, ids, mask, 3, fast=True, mode="compressed")
    assert calls  # the compressed layers of every call after the first
    calls.clear()
    cache = EchoKVCache(model, recon, mode="compressed", fast=True)
    outside = torch.cat([model(ids[:, s : s + 3], past_key_values=cache).logits for s in range(0, 12, 3)], dim=1)
    assert not calls  # outside the scope: rebuilt explicitly, the same outputs
    assert torch.allclose(outside, explicit, atol=1e-6) and torch.allclose(inside, explicit, atol=1e-5, rtol=1e-4)


def test_the_model_is_unchanged_by_a_cache_and_by_generate(trained, monkeypatch):
    model, recon = trained
    before = _attention_settings(model)
    cache = EchoKVCache(model, recon, mode="compressed", fast=True)
    assert _attention_settings(model) == before
    calls = _fast_calls(monkeypatch)
    ids = torch.randint(3, 250, (1, 9))
    new = generate(model, ids, cache, max_new_tokens=5)
    assert calls and _attention_settings(model) == before  # fast inside generate, restored after it
    with echokv_attention(model):
        assert _attention_settings(model) != before
    assert _attention_settings(model) == before
    ref = generate(model, ids, EchoKVCache(model, recon, mode="compressed", fast=False), max_new_tokens=5)
    assert torch.equal(new, ref)
