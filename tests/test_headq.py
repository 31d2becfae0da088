"""The fast codec EchoKV-Q (codecs/headq.py): its byte budget, its stored bytes, its refusals. Its decode paths
are tested against the explicit rebuild in tests/test_decode_paths.py, its kernels in tests/test_kernels.py."""

from __future__ import annotations

import pytest
import torch

from echokv.cache import CompressedCache, accounting
from echokv.codecs.headq import SINK_TOKENS, TOKEN_BLOCK, allocate, fit, token_bytes
from echokv.tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", head_dim=32)


def test_allocation_meets_the_byte_budget_and_spends_it():
    model = tiny_model("llama", head_dim=32, dtype=torch.bfloat16)
    for ratio in (0.5, 0.75, 0.875):
        codec = fit(model, torch.randint(3, 250, (4, 64)), ratio)
        w = codec.widths
        stored = sum(token_bytes(w[layer][kind], kind) for layer in w for kind in ("k", "v"))
        full = 2 * len(w) * 32 * 2  # K and V per token and head, bfloat16
        assert stored <= (1 - ratio) * full + 1e-9
        assert stored >= (1 - ratio) * full * 0.8  # the budget is spent, not left over


def test_allocate_picks_the_cheapest_error_per_byte():
    opts = {("a", "k"): [("a1", 10, 1.0), ("a2", 20, 0.1)], ("b", "k"): [("b1", 10, 0.5), ("b2", 20, 0.45)]}
    assert allocate(opts, 30) == {("a", "k"): "a2", ("b", "k"): "b1"}
    with pytest.raises(ValueError, match="no allocation fits"):
        allocate(opts, 5)


def test_stored_bytes_are_the_counted_bytes(llama):
    codec = fit(llama, torch.randint(3, 250, (4, 64)), 0.75)
    cache = CompressedCache(llama, codec, mode="compressed", fast=True)
    n = 2 * TOKEN_BLOCK + 5
    with torch.no_grad():
        llama(torch.randint(3, 250, (2, n)), past_key_values=cache)
    heads, d, layers = 2, 32, 4
    stored = sum(token_bytes(codec.widths[layer][kind], kind) for layer in codec.widths for kind in ("k", "v"))
    # batch 2; 5 recent tokens exact, and the SINK_TOKENS first ones kept exact beside their codes
    expect = 2 * (2 * TOKEN_BLOCK * heads * stored + (5 + SINK_TOKENS) * heads * layers * 2 * d * 4)
    assert cache.nbytes() == expect
    assert cache.kept_fraction() == pytest.approx(expect / (2 * n * heads * layers * 2 * d * 4))


@pytest.mark.parametrize("context", [2 * TOKEN_BLOCK + 5, 3 * TOKEN_BLOCK + 40])
def test_with_a_context_the_whole_cache_keeps_the_ratio_there(context):
    # the bench's budgets are measured at a context: the exact sinks and recent tokens count in what is kept there
    model = tiny_model("llama", head_dim=32, dtype=torch.bfloat16)
    blocks = torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0))
    kept = {}
    for at in (None, context):
        cache = CompressedCache(model, fit(model, blocks, 0.5, context=at), mode="compressed", fast=True)
        with torch.no_grad():
            model(torch.randint(3, 250, (1, context)), past_key_values=cache)
        full = context * 2 * 2 * 32 * 4 * 2  # K and V, 2 heads of 32, 4 layers, bfloat16
        kept[at] = accounting.reserved_nbytes(cache) / full  # what it holds, the room its buffers reserve included
    assert kept[None] > 0.5 >= kept[context] >= 0.5 - 0.05


def test_the_first_tokens_are_kept_exact(llama):
    codec = fit(llama, torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0)), 0.875)
    x = torch.randn(1, 2, 70, 32, generator=torch.Generator().manual_seed(2))
    k, v = codec.decode(codec.groups[0][0], codec.encode(0, [x], [x * 2], start=0))
    assert torch.equal(k[:, :, :SINK_TOKENS], x[:, :, :SINK_TOKENS]) and torch.equal(v[:, :, :SINK_TOKENS], 2 * x[:, :, :SINK_TOKENS])
    assert not torch.allclose(k[:, :, SINK_TOKENS:], x[:, :, SINK_TOKENS:])
    k, _ = codec.decode(codec.groups[0][0], codec.encode(0, [x], [x], start=2))  # a block from slot 2: two sinks
    assert torch.equal(k[:, :, : SINK_TOKENS - 2], x[:, :, : SINK_TOKENS - 2])
    assert not torch.allclose(k[:, :, SINK_TOKENS - 2 : SINK_TOKENS], x[:, :, SINK_TOKENS - 2 : SINK_TOKENS])


def test_refusals(llama):
    with pytest.raises(ValueError, match="between 0 and 1"):
        fit(llama, torch.randint(3, 250, (2, 16)), 1.0)
    with pytest.raises(ValueError, match="at least one block"):
        fit(llama, torch.randint(3, 250, (2, 16)), 0.5, context=10)
    with pytest.raises(ValueError, match="the exact ones .* alone take more than 0.1"):
        fit(llama, torch.randint(3, 250, (2, 16)), 0.9, context=TOKEN_BLOCK + 60)
    capped = tiny_model("llama")
    capped.config.attn_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps"):
        fit(capped, torch.randint(3, 250, (2, 16)), 0.5)


def test_encode_decode_error_is_what_the_allocation_measured(llama):
    from echokv.codecs.headq import _error

    codec = fit(llama, torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0)), 0.75)
    layer = codec.groups[0][0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 40, 32, generator=g)
    # values (keys are measured in their queries' metric, not in their own space)
    back = codec.decode(layer, codec.encode(0, [x], [x], start=SINK_TOKENS))[1].float()  # a block with no sinks
    p = codec.params[layer]
    z = torch.einsum("bhtd,hde->bhte", x - p["v_mean"][None, :, None], p["v_encode"])[0]
    std = p["v_basis"].norm(dim=1)  # the value basis columns: unit vectors times the deviations
    assert float((back - x).pow(2).sum()) == pytest.approx(_error(z, codec.widths[layer]["v"], std), rel=1e-3)
    # every channel at 16 bits: the basis round trip is exact up to float16
    codec.widths[layer] = {"k": ((16, 32), (8, 0), (4, 0)), "v": ((16, 32), (8, 0), (4, 0))}
    k, _ = codec.decode(layer, codec.encode(0, [x], [x], start=SINK_TOKENS))
    torch.testing.assert_close(k.float(), x, rtol=1e-2, atol=2e-3)


def test_calibration_blocks_are_spread_over_the_context_where_rope_changes_only_the_rotation():
    from echokv.codecs.headq import _offsets
    from echokv.stats.capture import capture

    llama = tiny_model("llama")
    blocks = torch.randint(3, 250, (6, 16), generator=torch.Generator().manual_seed(0))
    offsets = _offsets(llama, blocks)
    top = llama.config.max_position_embeddings - 16
    assert offsets.shape == (6,) and (offsets >= 0).all() and (offsets <= top).all() and offsets.unique().numel() > 1
    assert torch.equal(offsets, _offsets(llama, blocks))  # deterministic
    seen = {}
    for name, off in (("at 0", None), ("spread", offsets)):
        got = []
        capture(llama, blocks, lambda layer, m, q, k, v, got=got: got.append((q, k)), layers=[1], progress=False,
                offsets=off)
        seen[name] = got
    for (q0, k0), (q1, k1) in zip(seen["at 0"], seen["spread"]):
        assert not torch.allclose(k0, k1)  # the keys are rotated elsewhere ...
        s0 = q0[:, :1] @ k0[:, :1].transpose(-1, -2)  # ... and score the same (query head 0 reads KV head 0)
        s1 = q1[:, :1] @ k1[:, :1].transpose(-1, -2)
        torch.testing.assert_close(s0, s1, rtol=1e-4, atol=1e-4)


def test_candidates_cover_every_width_subset_in_storage_order():
    from echokv.codecs.headq import CLASS_WIDTHS, N16, STEP, _candidates

    d = 32
    full = _candidates(d)
    assert all(tuple(w for w, _ in c) == CLASS_WIDTHS for c in full)
    assert all(0 < sum(n for _, n in c) <= d and c[0][1] in N16 for c in full)
    assert all(n % STEP == 0 for c in full for w, n in c if w != 16)
    assert len(full) == len(set(full))
    three = _candidates(d, (16, 8, 4))
    assert ((16, 0), (8, 0), (4, 32)) in three and all(len(c) == 3 for c in three)
    assert ((16, 0), (8, 8), (4, 8), (2, 16)) in full  # a 2-bit tail keeps channels the others would drop


def test_two_bit_classes_are_read_by_the_fast_path(llama):
    """A codec with int2 classes: the fast path (C++ kernel here) answers as attention over its decoded K/V."""
    from echokv import kernels

    codec = fit(llama, torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0)), 0.875)
    layer = codec.groups[0][0]
    codec.widths[layer] = {"k": ((16, 0), (8, 8), (4, 8), (2, 16)), "v": ((16, 0), (8, 0), (4, 8), (2, 24))}
    x = torch.randn(1, 2, 70, 32, generator=torch.Generator().manual_seed(3))
    stored = codec.encode(0, [x], [x], start=SINK_TOKENS)
    assert stored["k2"].shape[-1] == 16 * 2 // 8 and stored["v2"].shape[-1] == 24 * 2 // 8
    k, v = codec.decode(layer, stored)
    assert 0 < float((k.float() - x).pow(2).mean()) < float(x.pow(2).mean())
    q = torch.randn(1, 6, 1, 32, generator=torch.Generator().manual_seed(4))
    recent = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(5))
    fast = codec.fast_attention(layer, stored)(q, recent, recent, None, 32**-0.5)
    keys, values = torch.cat([k.float(), recent], -2), torch.cat([v.float(), recent], -2)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys.repeat_interleave(3, 1),
                                                            values.repeat_interleave(3, 1)).transpose(1, 2)
    torch.testing.assert_close(fast.float(), want, rtol=1e-3, atol=1e-3)
    widths = codec.widths[layer]["k"]
    assert kernels.path("torch", "cpu", widths) == "torch"


def test_two_bit_classes_leave_the_triton_kernel(monkeypatch, caplog):
    from echokv import kernels

    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_resolve_device", lambda kernel, device: "triton")  # as on a GPU
    two, four = ((8, 8), (4, 8), (2, 16)), ((8, 8), (4, 24))
    assert kernels.path("auto", "cpu", four) == "triton"
    with caplog.at_level("WARNING", logger="echokv"):
        assert kernels.path("auto", "cpu", two) == "torch"
    assert "does not read 2-bit classes; using the PyTorch path" in caplog.text
    with pytest.raises(RuntimeError, match="does not read 2-bit classes; use kernel='torch'"):
        kernels.path("triton", "cpu", two)
