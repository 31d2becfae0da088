"""Differential tests of every compressed decode path against its reference (issue #28).

The fast path (inside the echokv attention scope) and the explicit rebuild (outside it) are compared one step at a
time from the *same* cache state: a deep copy takes the explicit step, the cache itself the fast one. Comparing two
free-running caches would not test the paths: a quantizing cache stores each new token's K/V as codes, and a
rounding difference in one step flips codes, so two exact paths drift apart over steps (measured on SmolLM2 in
float32: one step 5e-5, sixteen free-running steps 0.09 logits).
"""

from __future__ import annotations

import copy

import pytest
import torch

from echokv.attention import echokv_attention
from echokv.codecs.mix import EchoKVCache
from echokv.generation import near_tie, prefill
from echokv.tiny import ARCHITECTURES, tiny_model
from helpers import train_tiny

RATIOS = (0.5, 0.75, 0.875)


@pytest.fixture(scope="module")
def networks():
    """(arch, ratio) -> (model, network), trained once per module."""
    made = {}

    def get(arch, ratio, **cfg):
        key = (arch, ratio, tuple(sorted(cfg.items())))
        if key not in made:
            model = tiny_model(arch)
            made[key] = (model, train_tiny(model, steps=2, compression_ratio=ratio, **cfg)[0])
        return made[key]

    return get


@torch.no_grad()
def _steps(model, cache, first, n, mask=None):
    """Greedy decode ``n`` steps from ``first`` [B, 1]; at each step the explicit path runs on a copy of the cache
    (outside the scope) and the fast path on the cache (inside it). Returns the per-step logit pairs."""
    pairs, tok = [], first
    for _ in range(n):
        kw = {}
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            kw["attention_mask"] = mask
        explicit = model(tok, past_key_values=copy.deepcopy(cache), **kw).logits[:, -1].float()
        with echokv_attention(model):
            fast = model(tok, past_key_values=cache, **kw).logits[:, -1].float()
        pairs.append((fast, explicit))
        tok = explicit.argmax(-1, keepdim=True)
    return pairs


def _prompt_then_steps(model, cache, ids, n):
    """Feed all but the last token of ``ids`` (one call: compressed after it), then check ``n`` steps from the last."""
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
    _check(_steps(model, cache, ids[:, -1:], n))


def _check(pairs, dtype=torch.float32):
    tol = near_tie(dtype)
    for step, (fast, explicit) in enumerate(pairs):
        torch.testing.assert_close(fast, explicit, rtol=1e-4, atol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
        top = explicit.topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > tol  # greedy tokens must agree wherever the reference is not a near tie
        assert torch.equal(fast.argmax(-1)[clear], explicit.argmax(-1)[clear]), f"step {step}: greedy tokens differ"


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_equals_explicit_every_step_from_token_0(networks, arch, ratio):
    model, net = networks(arch, ratio)
    ids = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    _prompt_then_steps(model, EchoKVCache(model, net, mode="compressed"), ids, 8)  # compressed from token 0


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("length", [1, 3])  # fewer tokens than one quantization group
def test_short_prompts(networks, ratio, length):
    model, net = networks("llama", ratio)
    _prompt_then_steps(model, EchoKVCache(model, net, mode="compressed"), torch.randint(3, 250, (1, length + 1)), 6)


@pytest.mark.parametrize("ratio", RATIOS)
def test_switch_mid_sequence_and_a_full_window(networks, ratio):
    model, net = networks("llama", ratio)
    for kw in ({"switch_at_tokens": 14}, {"mode": "compressed", "full_window": 5}):
        cache = EchoKVCache(model, net, **kw)
        ids = torch.randint(3, 250, (1, 10))
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache)
        assert not cache.is_compressed or "full_window" in kw
        _check(_steps(model, cache, ids[:, -1:], 10))
        assert cache.is_compressed


@pytest.mark.parametrize("ratio", RATIOS)
def test_batch_of_two_with_left_padding(networks, ratio):
    model, net = networks("llama", ratio)
    ids = torch.randint(3, 250, (2, 16))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    cache = EchoKVCache(model, net, mode="compressed")
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
    _check(_steps(model, cache, ids[:, -1:], 6, mask=mask[:, :-1]))


@pytest.mark.parametrize("ratio", RATIOS)
def test_prompt_longer_than_one_prefill_chunk_and_store_growth(networks, ratio):
    model, net = networks("llama", ratio)
    cache = EchoKVCache(model, net, mode="compressed")
    ids = torch.randint(3, 250, (1, 70))
    prefill(model, cache, ids[:, :-1], chunk_size=16)
    store = cache.stores[0]
    before = {name: buf.data_ptr() for name, (buf, _) in store.appender.buffers.items()}
    _check(_steps(model, cache, ids[:, -1:], 8))
    after = {name: buf.data_ptr() for name, (buf, _) in store.appender.buffers.items()}
    assert before != after  # the store's buffers grew (reallocated) during the decode steps


def test_reset_then_reuse_gives_the_same_logits_and_a_new_prompt_without_reset_is_refused(networks):
    model, net = networks("llama", 0.5)
    cache = EchoKVCache(model, net, mode="compressed")
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
        first = _steps(model, cache, ids[:, -1:], 4)
        with pytest.raises(ValueError, match="new prompt"):  # positions from 0 again: a new prompt
            model(ids[:, :-1], past_key_values=cache, cache_position=torch.arange(ids.shape[1] - 1))
        cache.reset()
        model(ids[:, :-1], past_key_values=cache)
        again = _steps(model, cache, ids[:, -1:], 4)
    for (f1, e1), (f2, e2) in zip(first, again):
        assert torch.equal(f1, f2) and torch.equal(e1, e2)


@pytest.mark.parametrize("variant, ratio", [("heads", 0.5), ("hybrid", 0.7)])
def test_the_other_variants_fast_paths_equal_their_references(networks, variant, ratio):
    # (the hybrid at 0.7: on a float32 model its key components keep at most half of the cache)
    model, net = networks("llama", ratio, variant=variant)
    _prompt_then_steps(model, EchoKVCache(model, net, mode="compressed"), torch.randint(3, 250, (1, 20)), 6)


# -- the fast codec, EchoKV-Q (codecs/headq.py): the fused kernel's path against the explicit rebuild ---------------
@pytest.fixture(scope="module")
def fast_codecs():
    from echokv.codecs.headq import fit

    made = {}

    def get(arch, ratio, kernel="auto"):
        if (arch, ratio) not in made:
            model = tiny_model(arch)
            made[(arch, ratio)] = (model, fit(model, torch.randint(3, 250, (4, 48)), ratio))
        model, codec = made[(arch, ratio)]
        codec.kernel = kernel
        return model, codec

    return get


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_fast_codec_equals_explicit_every_step(fast_codecs, arch, ratio, kernel):
    from echokv import kernels
    from echokv.cache import CompressedCache

    if kernel == "cpp" and kernels.path("auto") != "cpp":
        pytest.skip("the C++ kernel does not build here")
    model, codec = fast_codecs(arch, ratio, kernel)
    for length, kw in ((70, {"mode": "compressed"}), (3, {"mode": "compressed"}), (60, {"switch_at_tokens": 64})):
        _prompt_then_steps(model, CompressedCache(model, codec, fast=True, **kw),
                           torch.randint(3, 250, (1, length + 1)), 8)


@pytest.mark.parametrize("ratio", RATIOS)
def test_fast_codec_batch_with_left_padding_and_block_flushes(fast_codecs, ratio):
    from echokv.cache import CompressedCache

    model, codec = fast_codecs("llama", ratio)
    ids = torch.randint(3, 250, (2, 80))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    cache = CompressedCache(model, codec, mode="compressed", fast=True)
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
    assert cache.stores[0].n_tokens == 64 and cache.layers[0].recent_length() == 79 - 64  # whole blocks only
    _check(_steps(model, cache, ids[:, -1:], 6, mask=mask[:, :-1]))
    more = torch.randint(3, 250, (2, 130))  # two more blocks appended to the store
    mask = torch.cat([mask, torch.ones(2, 6 + 129, dtype=torch.long)], dim=1)  # 79 + 6 steps + 129 new
    with torch.no_grad():
        model(more[:, :-1], attention_mask=mask, past_key_values=cache)
    assert cache.stores[0].n_tokens == 192
    _check(_steps(model, cache, more[:, -1:], 4, mask=mask))


# -- full mode's decode steps (attention.packed_decode) against the stock SDPA call -----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", ["none", "padding", "per-head", "additive"])
def test_packed_decode_equals_the_stock_sdpa_call(dtype, masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from echokv.attention import packed_decode

    g = torch.Generator().manual_seed(0)
    b, h, rep, t, d = 2, 3, 3, 70, 64
    q = torch.randn(b, h * rep, 1, d, generator=g).to(dtype)
    buf = torch.randn(b, h, t + 9, d, generator=g).to(dtype)  # K/V as views into buffers with spare room
    k, v = buf[:, :, :t], (buf * 0.5)[:, :, 2 : t + 2]
    mask = None
    if masked == "padding":
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
        mask[1, ..., :11] = False
    elif masked == "per-head":
        mask = torch.rand(b, h * rep, 1, t, generator=g) > 0.3
    elif masked == "additive":
        mask = torch.randn(b, 1, 1, t, generator=g).to(dtype)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = rep, True
    ref = sdpa_attention_forward(module, q, k, v, mask, scaling=d**-0.5)[0]
    out = packed_decode(q, k, v, mask, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_divergence_says_where_and_by_how_much():
    from echokv.cache import FullCache
    from echokv.cli.demo import _verdict
    from echokv.generation import divergence

    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 6:]
    assert divergence(model, ids, ref, ref.clone(), lambda: FullCache(model)) is None
    other = ref.clone()
    other[2] = (ref[2] + 1) % 256
    split = divergence(model, ids, ref, other, lambda: FullCache(model))
    assert split["index"] == 2 and split["reference_token"] == int(ref[2]) and split["answer_token"] == int(other[2])
    # the same cache both ways: the answer's own cache preferred the reference's token by the same margin
    assert split["reference_margin"] == pytest.approx(-split["answer_margin"], abs=1e-5)
    assert split["near_tie"] == (split["reference_margin"] <= near_tie(torch.float32))

    class Tok:
        def decode(self, ids):
            return f"t{ids[0]}"

    assert "follows full mode's" in _verdict(None, Tok(), 1.0)
    line = _verdict({**split, "reference_margin": 0.5, "near_tie": True}, Tok(), 1.0)
    assert "token 2" in line and "near tie" in line
    assert "loss from compression" in _verdict({**split, "reference_margin": 3.0, "near_tie": False}, Tok(), 1.0)
