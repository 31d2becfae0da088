"""The tiered cache: full -> EchoKV-Q -> the cross-layer mix, switched on the byte budget (issue #24, item 4)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from echokv.attention import echokv_attention
from echokv.cache import CompressedCache
from echokv.cache.tiers import TieredCache
from echokv.codecs.headq import fit
from echokv.codecs.mix import MixCodec
from echokv.generation import prefill
from echokv.tiny import tiny_model
from helpers import train_tiny


@pytest.fixture(scope="module")
def ladder():
    model = tiny_model("llama")
    q = fit(model, torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0)), 0.5)
    mix = MixCodec(train_tiny(model, steps=2, compression_ratio=0.875)[0], model)
    return model, q, mix


def _full_bytes_per_token(model, ids):
    cache = CompressedCache(model, None, mode="full")
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache.nbytes() // ids.shape[1]


def _compressed_to_q(model, q, mix, batch: int, tokens: int, seed: int) -> TieredCache:
    """A ladder cache that took ``tokens`` random tokens and was switched to its first tier by a call."""
    ids = torch.randint(3, 250, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    cache = TieredCache(model, {"q": q, "mix": mix}, memory_budget_bytes=10**9)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cache.compress()
    return cache


def test_each_tier_is_taken_when_the_budget_requires_it_and_the_ranges_say_where_tokens_are(ladder):
    model, q, mix = ladder
    ids = torch.randint(3, 250, (1, 400), generator=torch.Generator().manual_seed(1))
    per_token = _full_bytes_per_token(model, ids[:, :8])
    budget = per_token * 100  # full holds 100 tokens; EchoKV-Q (about half) about 200; the mix far more
    cache = TieredCache(model, {"q": q, "mix": mix}, memory_budget_bytes=budget)
    seen = []
    with torch.no_grad():
        for t in range(0, 400, 20):
            model(ids[:, t : t + 20], past_key_values=cache)
            report = cache.memory_report()
            seen.append(report["tier"])
            assert report["cache_bytes"] == cache.nbytes()
            if report["tier"] != "mix":  # above the last tier, every call ends inside the budget
                assert report["cache_bytes"] <= budget, report
            ranges = report["tier_ranges"]
            assert ranges[0]["tokens"][0] == 0 and ranges[-1]["tokens"][1] == t + 20
            assert all(a["tokens"][1] == b["tokens"][0] for a, b in itertools.pairwise(ranges))
    assert seen[0] == "full" and "q" in seen and seen[-1] == "mix"
    assert seen.index("full") < seen.index("q") < seen.index("mix")  # down the ladder, never back
    names = [name for name, _ in cache.tier_changes]
    assert names == ["q", "mix"]
    assert report["cache_bytes"] <= budget  # the mix (an eighth) holds 400 tokens in 100 tokens' full bytes


def test_a_tier_change_stores_what_the_next_codec_makes_of_the_tier_above(ladder):
    model, q, mix = ladder
    cache = _compressed_to_q(model, q, mix, 1, 192, seed=2)
    assert cache.tier_now == "q" and cache.stores[0].n_tokens == 192
    expect = {}
    for store_q in cache.stores:
        for i in store_q.layers:
            expect[i] = q.decode(i, store_q.tensors)
    positions = cache.stored_positions.clone()
    cache.memory_budget_bytes = 1  # over: the next step down
    cache._descend()
    assert cache.tier_now == "mix" and cache.codec is mix
    for gi, store in enumerate(cache.stores):
        by_hand = mix.encode(gi, [expect[i][0] for i in store.layers], [expect[i][1] for i in store.layers],
                             positions=positions)
        assert by_hand.keys() == store.tensors.keys()
        for name, t in by_hand.items():
            torch.testing.assert_close(store.tensors[name], t, rtol=0, atol=0)
        for i in store.layers:
            assert cache.layers[i].store is store and cache.layers[i].codec is mix


def test_decoding_on_the_last_tier_fast_equals_explicit_and_reset_starts_full_again(ladder):
    model, q, mix = ladder
    ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(3))
    budget = _full_bytes_per_token(model, ids[:, :8]) * 60
    cache = TieredCache(model, [q, mix], memory_budget_bytes=budget)
    prefill(model, cache, ids[:, :-1], chunk_size=32)
    assert cache.tier == 1 and [name for name, _ in cache.tier_changes] == ["tier1", "tier2"]
    tok = ids[:, -1:]
    with torch.no_grad():
        for _ in range(4):
            explicit = model(tok, past_key_values=copy.deepcopy(cache)).logits[:, -1].float()
            with echokv_attention(model):
                fast = model(tok, past_key_values=cache).logits[:, -1].float()
            torch.testing.assert_close(fast, explicit, rtol=1e-4, atol=1e-4)
            tok = explicit.argmax(-1, keepdim=True)
    cache.reset()
    assert cache.tier_now == "full" and cache.codec is q and cache.tier_changes == []
    assert all(cache.layers[i].codec is q for i in q.layers) and cache.stored_positions is None
    with torch.no_grad():
        model(ids[:, :40], past_key_values=cache)
    assert cache.memory_report()["tier_ranges"] == [{"tier": "full", "tokens": [0, 40]}]


def test_a_batch_selection_keeps_the_stored_positions_in_step(ladder):
    model, q, mix = ladder
    cache = _compressed_to_q(model, q, mix, 3, 130, seed=4)
    assert cache.stored_positions.shape == (3, 128)
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.stored_positions.shape == (2, 128)
    cache.memory_budget_bytes = 1
    cache._descend()
    # the mix stores every token (blocks of 1): the two EchoKV-Q kept exact follow their positions
    assert cache.stores[0].n_tokens == 130 and cache.stored_positions.shape == (2, 130)
    assert torch.equal(cache.stored_positions, torch.arange(130).expand(2, 130))
    assert cache.memory_report()["over_budget"]


def test_bad_tiers_are_refused_in_one_line(ladder):
    model, q, mix = ladder
    with pytest.raises(ValueError, match="at least one codec"):
        TieredCache(model, [], memory_budget_bytes=1000)
    with pytest.raises(TypeError, match="not a codec"):
        TieredCache(model, {"q": q, "mix": "A0.875"}, memory_budget_bytes=1000)
    other = fit(model, torch.randint(3, 250, (2, 32)), 0.5)
    other.groups = other.groups[:1]  # a codec of fewer layers
    with pytest.raises(ValueError, match="same layers"):
        TieredCache(model, [q, other], memory_budget_bytes=1000)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        TieredCache(model, [q, mix], memory_budget_bytes=0)


def test_a_full_cache_reports_the_tokens_it_holds(ladder):
    from echokv.cache import FullCache

    model = ladder[0]
    cache = FullCache(model)
    with torch.no_grad():
        model(torch.randint(3, 250, (1, 37)), past_key_values=cache)
    assert cache.memory_report()["tokens"] == 37  # was 0: it counted compressible layers only
