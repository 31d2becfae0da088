"""The fast compressed decode path gives the same outputs as the explicit reconstruction."""

from __future__ import annotations

import pytest
import torch

from conftest import train_tiny
from echokv.cache import EchoKVCache
from echokv.tiny import tiny_model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def trained(request):
    model = tiny_model(request.param)
    recon, _ = train_tiny(model, steps=3)
    return model, recon


def _chunked_logits(model, recon, ids, mask, chunk, fast, **kw):
    cache = EchoKVCache(model, recon, fast=fast, **kw)
    out = []
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
    gen = [
        model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                       past_key_values=EchoKVCache(model, recon, mode="compressed", fast=fast))
        for fast in (False, True)
    ]
    assert torch.equal(gen[0], gen[1])


def test_fast_equals_explicit_after_a_mid_sequence_switch_and_with_a_window(trained):
    model, recon = trained
    ids = torch.randint(3, 250, (1, 12))
    outs = [
        model.generate(ids, max_new_tokens=20, do_sample=False,
                       past_key_values=EchoKVCache(model, recon, switch_at_tokens=20, full_window=4, fast=fast))
        for fast in (False, True)
    ]
    assert torch.equal(outs[0], outs[1])
