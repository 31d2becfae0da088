"""Padded batches through echokv.generate / prefill: each row answers as its prompt alone (left and right padding,
full and compressed caches: the mix, EchoKV-Q and every baseline codec), and a padded batch without a mask is
refused."""

from __future__ import annotations

import pytest
import torch

from echokv import EchoKVCache, generate, prefill
from echokv.cache import CompressedCache, FullCache
from echokv.tiny import tiny_model
from helpers import train_tiny

PAD = 0  # the tiny models' pad token
NEW = 6


@pytest.fixture(scope="module")
def setup():
    from echokv.codecs.headq import fit

    model = tiny_model("llama")
    net, _ = train_tiny(model, compression_ratio=0.5, steps=2)
    codec = fit(model, torch.randint(3, 250, (4, 48), generator=torch.Generator().manual_seed(2)), 0.5)
    return model, net, codec


CACHES = {
    "full": lambda model, net, codec: FullCache(model),
    "echokv": lambda model, net, codec: EchoKVCache(model, net, mode="compressed"),
    # the fast codec stores blocks of 64 tokens: the long prompt below fills one
    "echokv-q": lambda model, net, codec: CompressedCache(model, codec, mode="compressed", fast=True),
}


def _baseline(name):
    """A baseline method's cache (per-token quantization, KIVI, projections, head drop), compressed from token 0."""
    from echokv.stats.collect import Calibration
    from echokv_lab.methods import make_method

    def make(model, net, codec):
        meth = make_method(name, 0.5)
        meth.prepare(model, None, Calibration(blocks=torch.randint(3, 250, (4, 48),
                                                                   generator=torch.Generator().manual_seed(3))))
        cache = meth.new_cache(model)
        cache.compress()
        return cache
    return make


CACHES.update({name: _baseline(name) for name in ("quant", "kivi", "lowrank", "xlayer-svd", "headdrop")})


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 250, (n,), generator=g) for n in (90, 23)]


def _padded(prompts, side: str):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", list(CACHES))
def test_a_padded_batch_answers_as_each_prompt_alone(setup, kind, side):
    model, net, codec = setup
    make = CACHES[kind]
    prompts = _prompts()
    alone = [generate(model, p[None], make(model, net, codec), max_new_tokens=NEW)[0] for p in prompts]
    ids, mask = _padded(prompts, side)
    cache = make(model, net, codec)
    out = generate(model, ids, cache, max_new_tokens=NEW, attention_mask=mask)
    for i, a in enumerate(alone):
        assert out[i].tolist() == a.tolist(), f"row {i} ({len(prompts[i])} tokens, {side} padding)"
    if kind != "full":
        assert cache.kept_fraction() < 1  # the compressed store was used


def test_an_unmasked_padded_batch_is_refused_and_an_unpadded_one_runs(setup):
    model = setup[0]
    for side in ("left", "right"):
        ids, _ = _padded(_prompts(), side)
        with pytest.raises(ValueError, match="padded batch.*attention_mask") as err:
            generate(model, ids, FullCache(model), max_new_tokens=2)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="padded batch.*attention_mask"):
            prefill(model, FullCache(model), ids)
    same = torch.randint(3, 250, (2, 10))
    assert generate(model, same, FullCache(model), max_new_tokens=2).shape == (2, 2)
    # a pad id inside a prompt (SmolLM2's pad is its end-of-turn token) is not padding
    inner = same.clone()
    inner[:, 4] = PAD
    assert generate(model, inner, FullCache(model), max_new_tokens=2).shape == (2, 2)


def test_prefill_with_left_padding_matches_each_prompt_alone_and_refuses_right_padding(setup):
    model = setup[0]
    prompts = _prompts()
    ids, mask = _padded(prompts, "left")
    logits = prefill(model, FullCache(model), ids, attention_mask=mask, chunk_size=16)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], prefill(model, FullCache(model), p[None])[0], rtol=1e-4, atol=1e-4)
    ids, mask = _padded(prompts, "right")
    with pytest.raises(ValueError, match="left-padded"):
        prefill(model, FullCache(model), ids, attention_mask=mask)


@pytest.mark.parametrize("mask, message", [
    (lambda ids: ids.float(), "0 and 1"),
    (lambda ids: torch.ones(2, 3, dtype=torch.long), "shape"),
    (lambda ids: torch.zeros_like(ids), "without a token"),
    (lambda ids: ids * 0 + 2, "only 0"),
    (lambda ids: ids.tolist(), "tensor"),
])
def test_bad_masks_are_one_line(setup, mask, message):
    model = setup[0]
    ids = torch.randint(3, 250, (2, 8))
    with pytest.raises((ValueError, TypeError), match=message) as err:
        generate(model, ids, FullCache(model), max_new_tokens=2, attention_mask=mask(ids))
    assert "\n" not in str(err.value)


def test_a_padded_batch_is_not_continued_in_a_used_cache(setup):
    model = setup[0]
    ids, mask = _padded(_prompts(), "left")
    cache = FullCache(model)
    new = generate(model, ids, cache, max_new_tokens=2, attention_mask=mask)
    more = torch.cat([ids, new], 1)
    with pytest.raises(ValueError, match="reset"):
        generate(model, more, cache, max_new_tokens=2, attention_mask=torch.cat([mask, torch.ones_like(new)], 1))
