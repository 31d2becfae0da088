"""EchoKVCache / CompressedCache: a drop-in transformers cache with an on-demand switch."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from echokv.cache import Appender, GrowingLayer, echokv_attention
from echokv.codecs.mix import EchoKVCache
from echokv.generation import encode_prompt, prefill
from echokv.tiny import ARCHITECTURES, tiny_model
from helpers import exact_tiny_llama, one_head_layout, train_tiny


@pytest.fixture(scope="module")
def exact():
    model = exact_tiny_llama()
    recon, _ = train_tiny(model, one_head_layout(), steps=0, ridge=1e-9)
    return model, recon


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request):
    model = tiny_model(request.param)
    recon, _ = train_tiny(model, steps=2)
    return model, recon


def test_full_mode_is_bit_identical_to_the_default_cache(trained):
    model, recon = trained
    ids = torch.randint(3, 250, (2, 21))
    ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    cache = EchoKVCache(model, recon, mode="full")
    assert torch.equal(model(ids, past_key_values=cache).logits, ref)
    gen_ref = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=DynamicCache(config=model.config))
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=EchoKVCache(model, recon, mode="full"))
    assert torch.equal(gen, gen_ref)


def test_full_mode_appends_in_place_and_stays_bit_identical(trained):
    model, recon = trained
    ids = torch.randint(3, 250, (2, 130))
    ref, cache = DynamicCache(config=model.config), EchoKVCache(model, recon, mode="full")
    a, b = model(ids, past_key_values=ref).logits, model(ids, past_key_values=cache).logits
    assert torch.equal(a, b)
    layer = cache.layers[cache.compressible[0]]
    buffer = layer.keys.data_ptr()
    for step in range(3):  # 130 tokens were given 130 // 64 = 2 tokens of spare room
        tok = a[:, -1:].argmax(-1)
        a, b = model(tok, past_key_values=ref).logits, model(tok, past_key_values=cache).logits
        assert torch.equal(a, b)
        assert (layer.keys.data_ptr() == buffer) == (step < 2)  # written in place until the room is used
    assert cache.nbytes() == sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in ref.layers)
    live, held = _growing_bytes(cache)
    assert live < held <= live * (1 + 1 / 64)  # spare room: at most 1/64
    assert cache.reserved_nbytes() == _held_bytes(cache)


def test_appender_equals_cat_and_never_overwrites_what_it_returned():
    app, x, ref, returned = Appender(), None, None, []
    for n in (100, 1, 1, 5, 1, 3):
        t = torch.randn(1, 2, n, 4)
        x = app.append("k", x, t)
        ref = t if ref is None else torch.cat([ref, t], -2)
        assert torch.equal(x, ref)
        returned.append((x, x.clone()))
    x, ref = x[..., :-3, :], ref[..., :-3, :]  # edited from outside (a crop): appending copies it
    t = torch.randn(1, 2, 2, 4)
    x = app.append("k", x, t)
    assert torch.equal(x, torch.cat([ref, t], -2))
    assert all(torch.equal(view, copy) for view, copy in returned)


def test_a_copied_cache_decodes_like_the_original(trained):
    import copy

    model, recon = trained
    cache = EchoKVCache(model, recon, mode="compressed")
    logits = model(torch.randint(3, 250, (1, 140)), past_key_values=cache).logits
    twin = copy.deepcopy(cache)
    tok = logits[:, -1:].argmax(-1)
    with echokv_attention(model):
        for _ in range(3):
            a, b = model(tok, past_key_values=cache).logits, model(tok, past_key_values=twin).logits
            assert torch.equal(a, b)
            tok = a[:, -1:].argmax(-1)


def test_compressed_with_exact_reconstructor_reproduces_full_logits(exact):
    model, recon = exact
    ids = torch.randint(3, 250, (1, 40))
    ref = model(ids).logits
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        out = torch.cat([model(ids[:, s : s + 7], past_key_values=cache).logits for s in range(0, 40, 7)], dim=1)
    # half the heads, and the positions pre-RoPE keys are stored with
    assert cache.memory_report()["kept_fraction"] == pytest.approx(recon.layout.kept_fraction()) == pytest.approx(
        0.5, abs=0.02)
    assert torch.allclose(out, ref, atol=1e-4)


def test_switch_mid_generation_keeps_the_prefix(trained):
    model, recon = trained
    ids = torch.randint(3, 250, (1, 16))
    full = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=DynamicCache(config=model.config))
    cache = EchoKVCache(model, recon, switch_at_tokens=16 + 10)
    with echokv_attention(model):
        mixed = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
    assert cache.memory_report()["mode"] == "compressed" and cache.switched_at == 26
    # tokens produced before the switch are unchanged
    assert torch.equal(mixed[:, : 16 + 11], full[:, : 16 + 11])


def test_manual_compress_converts_and_frees(trained):
    model, recon = trained
    cache = EchoKVCache(model, recon, mode="full")
    model(torch.randint(3, 250, (1, 30)), past_key_values=cache)
    before = cache.nbytes()
    cache.compress()
    after = cache.memory_report()
    assert after["mode"] == "compressed" and after["cache_bytes"] < before
    assert after["full_cache_bytes"] == before
    for i in cache.compressible:
        assert cache.layers[i].recent_length() == 0 and cache.layers[i].store.n_tokens == 30


def test_memory_budget_switch(trained):
    model, recon = trained
    cache = EchoKVCache(model, recon, memory_budget_bytes=1)
    model(torch.randint(3, 250, (1, 5)), past_key_values=cache)
    assert cache.mode_now == "compressed"
    roomy = EchoKVCache(model, recon, memory_budget_bytes=10**9)
    model(torch.randint(3, 250, (1, 5)), past_key_values=roomy)
    assert roomy.mode_now == "full"


def _held_bytes(cache) -> int:
    """Bytes of the distinct memory blocks behind every tensor the cache's layers hold."""
    seen, total = set(), 0
    for layer in cache.layers:
        store = getattr(layer, "store", None)
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None),
                   *(store.tensors.values() if store is not None else ())]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _growing_bytes(cache) -> tuple[int, int]:
    """(bytes of the tokens, bytes of the buffers behind them) of the layers that grow in place."""
    tensors = [t for lay in cache.layers if isinstance(lay, GrowingLayer) for t in lay.held()]
    tensors += [t for store in cache.stores for t in store.held()]
    blocks = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(t.numel() * t.element_size() for t in tensors), sum(blocks.values())


@pytest.mark.parametrize("window", [0, 5])
def test_accounting_equals_the_tensors_held(trained, window):
    model, recon = trained
    cache = EchoKVCache(model, recon, mode="compressed", full_window=window)
    ids = torch.randint(3, 250, (2, 23))
    with echokv_attention(model):
        model(ids, past_key_values=cache)
        model(ids[:, :1], past_key_values=cache)
        model(torch.randint(3, 250, (2, 120)), past_key_values=cache)  # enough tokens for spare room
        model(ids[:, :1], past_key_values=cache)
    report = cache.memory_report()
    assert report["reserved_bytes"] == _held_bytes(cache)  # the compressed prefix's K/V really released
    live, held = _growing_bytes(cache)
    assert live < held <= live * (1 + 1 / 64)
    ref = DynamicCache(config=model.config)
    model(torch.cat([ids, ids[:, :1]], 1), past_key_values=ref)
    model(torch.randint(3, 250, (2, 121)), past_key_values=ref)
    full = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in ref.layers)
    assert report["full_cache_bytes"] == full
    assert report["kept_fraction"] == pytest.approx(report["cache_bytes"] / full)
    for i in cache.compressible:
        assert cache.layers[i].recent_length() == window


def test_batch_with_left_padding_and_sampling(exact):
    model, recon = exact
    ids = torch.randint(3, 250, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache,
                             pad_token_id=0)
    assert torch.equal(out, ref)
    torch.manual_seed(1)
    s_ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0)
    torch.manual_seed(1)
    s_out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0,
                           past_key_values=EchoKVCache(model, recon, mode="full"))
    assert torch.equal(s_out, s_ref)


def test_chunked_prefill_compresses_between_chunks(exact):
    model, recon = exact
    ids = torch.randint(3, 250, (1, 50))
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        logits = prefill(model, cache, ids, chunk_size=16)
    assert torch.allclose(logits, model(ids).logits[:, -1], atol=1e-4)
    assert all(cache.layers[i].store.n_tokens == 50 for i in cache.compressible)


def test_exact_prompt_prefill_attends_exactly_and_compresses_once_at_the_end(trained):
    """Chunks see each other's exact K/V (the last logits equal the full cache's), and the cache ends as a full
    cache compressed after the prompt: same stored tensors, same next steps."""
    model, recon = trained
    ids = torch.randint(3, 250, (2, 45))
    full = EchoKVCache(model, recon, mode="full")
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        ref_logits = prefill(model, full, ids, chunk_size=16)
        logits = prefill(model, cache, ids, chunk_size=16, exact_prompt=True)
        full.compress()
        assert torch.equal(logits, ref_logits)
        assert cache.is_compressed and cache.layers[cache.compressible[0]].recent_length() == 0
        for a, b in zip(cache.stores, full.stores, strict=True):
            assert a.n_tokens == b.n_tokens == 45 and a.tensors.keys() == b.tensors.keys()
            assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        tok = logits[:, None].argmax(-1)
        steps = [model(tok, past_key_values=c).logits for c in (cache, full)]
    assert torch.equal(steps[0], steps[1])
    with pytest.raises(TypeError, match="exact_prompt must be True or False"):
        prefill(model, cache, ids, exact_prompt="yes")


def test_generate_continues_from_a_prefilled_cache(exact):
    model, recon = exact
    ids = torch.randint(3, 250, (1, 30))
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        prefill(model, cache, ids[:, :-1], chunk_size=8)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))


def test_gemma3_sliding_layers_keep_their_own_behaviour():
    model = tiny_model("gemma3")
    recon, _ = train_tiny(model, steps=0)
    cache = EchoKVCache(model, recon, mode="compressed")
    with echokv_attention(model):
        model(torch.randint(3, 250, (1, 40)), past_key_values=cache)
    assert cache.compressible == [2, 5]
    for i in (0, 1, 3, 4):
        assert type(cache.layers[i]).__name__ == "DynamicSlidingWindowLayer"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "sometimes"}, "unknown mode"),
        ({"mode": "auto"}, "needs switch_at_tokens or memory_budget_bytes"),
        ({"switch_at_tokens": 0}, "switch_at_tokens must be a positive integer"),
        ({"memory_budget_bytes": -5}, "memory_budget_bytes must be a positive integer"),
        ({"mode": "full", "full_window": -1}, "full_window must be a non-negative integer"),
    ],
)
def test_bad_cache_settings(trained, kwargs, message):
    model, recon = trained
    with pytest.raises(ValueError, match=message):
        EchoKVCache(model, recon, **kwargs)


def test_artifact_for_another_model_is_refused_by_the_cache(tmp_path):
    from echokv import artifact

    model = tiny_model(seed=0)
    recon, report = train_tiny(model, steps=0)
    artifact.save(recon, model, tmp_path / "a", report)
    with pytest.raises(artifact.ArtifactError, match="different model"):
        EchoKVCache(tiny_model(seed=5), tmp_path / "a")


@pytest.mark.real_model
def test_real_model_keeps_full_mode_answer_before_switching(smollm2, smollm2_artifact):
    model, tok = smollm2
    ids = encode_prompt(tok, "What is the capital of France?")
    cache = EchoKVCache(model, smollm2_artifact, switch_at_tokens=4096)
    with echokv_attention(model):
        out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache,
                             attention_mask=torch.ones_like(ids))
    assert cache.memory_report()["mode"] == "full"
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.real_model
@pytest.mark.parametrize("which", ["smollm2_artifact", "smollm2_heads_artifact"])
def test_real_model_answers_after_switching(smollm2, which, request):
    """The default (mix) and the head-only data layout keep this answer at 0.5 (the paper layout, S=2 and
    m=0, loses it: measured)."""
    smollm2_artifact = request.getfixturevalue(which)
    model, tok = smollm2
    ids = encode_prompt(tok, "What is the capital of France?")
    cache = EchoKVCache(model, smollm2_artifact, switch_at_tokens=ids.shape[1] - 5)
    with echokv_attention(model):
        out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache,
                             attention_mask=torch.ones_like(ids))
    assert cache.memory_report()["mode"] == "compressed"
    assert cache.memory_report()["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


# -- the group store: one object per group, selected once ------------------------------------------------
@pytest.fixture(scope="module")
def grouped():
    model = tiny_model("llama")
    recon, _ = train_tiny(model, steps=0, variant="heads")  # data layout: one group of the 4 layers
    return model, recon


def _decode(model, cache, tok):
    return model(tok, past_key_values=cache).logits[:, -1]


def test_a_group_shares_one_store(grouped):
    model, recon = grouped
    cache = EchoKVCache(model, recon, mode="compressed")
    model(torch.randint(3, 250, (1, 10)), past_key_values=cache)
    assert len(cache.stores) == len(recon.layout.groups) == 1
    assert all(cache.layers[i].store is cache.stores[0] for i in cache.compressible)
    assert cache.stores[0].n_tokens == 10 and "pos" in cache.stores[0].tensors


@pytest.mark.parametrize("edit", ["select", "reorder", "repeat"])
def test_the_group_store_under_batch_edits(grouped, edit):
    model, recon = grouped
    ids = torch.randint(3, 250, (3, 20))
    tok = torch.randint(3, 250, (3, 1))
    index = torch.tensor([2, 0])
    cache = EchoKVCache(model, recon, mode="compressed", full_window=4)
    model(ids, past_key_values=cache)
    if edit == "select":
        cache.batch_select_indices(index)
        ids, tok = ids[index], tok[index]
    elif edit == "reorder":
        index = torch.tensor([1, 2, 0])
        cache.reorder_cache(index)
        ids, tok = ids[index], tok[index]
    else:
        cache.batch_repeat_interleave(2)
        ids, tok = ids.repeat_interleave(2, 0), tok.repeat_interleave(2, 0)
    ref = EchoKVCache(model, recon, mode="compressed", full_window=4)
    model(ids, past_key_values=ref)
    assert all(t.shape[0] == ids.shape[0] for t in cache.stores[0].tensors.values())  # edited once, not per layer
    assert torch.equal(_decode(model, cache, tok), _decode(model, ref, tok))


def test_crop_removes_recent_tokens_only(grouped):
    model, recon = grouped
    cache = EchoKVCache(model, recon, mode="compressed", full_window=4)
    model(torch.randint(3, 250, (1, 20)), past_key_values=cache)
    stored = {k: v.clone() for k, v in cache.stores[0].tensors.items()}
    cache.crop(-3)
    assert cache.get_seq_length(cache.compressible[0]) == 17 and cache.stores[0].n_tokens == 16
    assert all(torch.equal(stored[k], v) for k, v in cache.stores[0].tensors.items())
    with pytest.raises(NotImplementedError, match="compressed tokens"):
        cache.crop(-2)
    _decode(model, cache, torch.randint(3, 250, (1, 1)))  # still decodes


# -- accounting: one count for every kind of cache ----------------------------------------------------------
def test_accounting_agrees_across_cache_types(trained):
    from echokv.cache import FullCache, accounting

    model, recon = trained
    ids = torch.randint(3, 250, (2, 37))
    caches = [DynamicCache(config=model.config), EchoKVCache(model, recon, mode="full"), FullCache(model)]
    for cache in caches:
        model(ids, past_key_values=cache)
    stock = caches[0]
    held = sum(t.numel() * t.element_size() for lay in stock.layers for t in (lay.keys, lay.values))
    for cache in caches:
        assert accounting.nbytes(cache) == held
        assert accounting.full_nbytes(cache) == accounting.full_nbytes(stock)
        assert accounting.kept_fraction(cache) == 1.0
    if any(getattr(lay, "is_sliding", False) for lay in stock.layers):
        return  # (kvpress leaves sliding-window models alone)
    # a cache that dropped tokens (as kvpress's presses do) against the full cache of the tokens it saw
    for lay in stock.layers:
        lay.keys, lay.values = lay.keys[:, :, ::2], lay.values[:, :, ::2]
    assert accounting.nbytes(stock) < held == accounting.full_nbytes(stock, tokens=37) == accounting.full_nbytes(caches[2])


def test_accounting_of_transformers_quantized_cache():
    from transformers.cache_utils import QuantizedCache

    from echokv.cache import accounting

    model = tiny_model("llama")
    try:
        cache = QuantizedCache("fp8", model.config)
    except ValueError:
        pytest.skip("this transformers has no fp8 QuantizedCache")
    ids = torch.randint(3, 250, (1, 30))
    model(ids, past_key_values=cache)
    ref = DynamicCache(config=model.config)
    model(ids, past_key_values=ref)
    n_layers, elements = len(cache.layers), ref.layers[0].keys.numel()
    assert accounting.full_nbytes(cache) == accounting.full_nbytes(ref)
    assert accounting.nbytes(cache) == n_layers * 2 * (elements * 1 + 4)  # fp8 codes + a float32 scale each
