"""Retained components (echokv.mixes, codecs/mix.py, training.py): pre-RoPE keys, learned mixes, precision per
component, the byte budget."""

from __future__ import annotations

import pytest
import torch

from echokv.attention import echokv_attention
from echokv.cache import CompressedCache
from echokv.codecs.mix import MixCodec
from echokv.config import TrainConfig
from echokv.mixes import (
    WIDTHS,
    Mixes,
    MixLayout,
    Part,
    allocate,
    class_bits,
    dequantize,
    fake_quantize,
    pca_pair,
    quantize,
)
from echokv.stats.moments import ValueMoments
from echokv.tiny import tiny_model
from helpers import exact_tiny_llama, one_head_layout, train_tiny


def _decode_steps(model, codec, ids, switch_at, fast, mask=None):
    """Logits of ``ids`` fed as a prefix (full mode), a switch, then one token at a time."""
    cache = CompressedCache(model, codec, mode="full", fast=fast)
    with torch.no_grad(), echokv_attention(model):
        kw = {} if mask is None else {"attention_mask": mask[:, :switch_at]}
        out = [model(ids[:, :switch_at], past_key_values=cache, use_cache=True, **kw).logits]
        cache.compress()
        for t in range(switch_at, ids.shape[1]):
            kw = {} if mask is None else {"attention_mask": mask[:, : t + 1]}
            out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kw).logits)
    return torch.cat(out, 1), cache


# -- quantized storage ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("c", [1, 7, 64, 65, 130])
def test_quantized_components_round_trip_within_half_a_step(width, c):
    z = torch.randn(3, 5, c) * 2
    st = quantize(z, width)
    back = dequantize(st, width, c)
    step = st["s"].float()  # per token and group
    n_groups = st["s"].shape[-1]
    size = -(-c // n_groups)
    bound = step.repeat_interleave(size, -1)[..., :c] / 2 + 1e-6
    assert (back - z).abs().le(bound).all()
    # the bytes stored are the bytes counted
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in st.values()) / (3 * 5)
    assert stored_bits == class_bits(c, width)


def test_fake_quantize_passes_the_gradient_straight_through():
    z = torch.randn(4, 70, requires_grad=True)
    fake_quantize(z, 4).sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_the_allocator_never_exceeds_the_budget_and_spends_it():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        parts = [torch.rand(int(torch.randint(1, 40, (1,), generator=gen)), len(WIDTHS), generator=gen)
                 .sort(1, descending=True).values for _ in range(3)]
        for e in parts:
            e[:, -1] = 0.0  # 16 bits is exact
        dims = sum(e.shape[0] for e in parts)
        budget = float(torch.rand(1, generator=gen)) * 16 * dims
        widths, spent = allocate(parts, budget)
        assert spent <= budget + 1e-9
        assert all(w in WIDTHS for ws in widths for w in ws)
        # nothing affordable is left: every remaining single step costs more than what is left
        left = budget - spent
        assert left < 20 or all(w == 16 for ws in widths for w in ws)


# -- the codec ------------------------------------------------------------------------------------------------------
def _full_rank_mixes(model, width: int = 32) -> Mixes:
    """PCA of random features at full rank, every component at ``width`` (32: exact)."""
    from echokv.models import kv_geometry

    geo = kv_geometry(model)
    groups = [geo.full_attention_layers[i : i + 2] for i in range(0, len(geo.full_attention_layers), 2)]
    dim = 2 * geo.num_kv_heads * geo.head_dim
    parts = [Part(kind, gi, g, [width] * dim) for gi, g in enumerate(groups) for kind in ("k", "v")]
    layout = MixLayout(geo.full_attention_layers, geo.num_kv_heads, geo.head_dim, groups, parts, element_bits=32)
    mixes = Mixes(layout)
    for i in range(len(parts)):
        mom = ValueMoments(dim // geo.head_dim, geo.head_dim)
        mom.add(torch.randn(500, dim // geo.head_dim, geo.head_dim) @ torch.randn(geo.head_dim, geo.head_dim))
        mixes.set_part(i, *pca_pair(mom))
    return mixes.requires_grad_(False)


def test_the_learned_mix_codec_at_full_rank_is_exact():
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (2, 30))
    full = model(ids).logits
    for fast in (False, True):
        logits, _ = _decode_steps(model, MixCodec(_full_rank_mixes(model), model), ids, 20, fast)
        assert torch.allclose(logits, full, atol=1e-4), fast


def test_pre_rope_heads_are_exact_at_any_position_with_left_padding():
    """Head 1 of the exact model is a linear map of head 0 before RoPE too: retained head 0 rebuilds it at every
    position, including positions never calibrated and a left-padded row."""
    model = exact_tiny_llama()
    net, report = train_tiny(model, one_head_layout(), steps=0, variant="heads", keys="pre-rope", compression_ratio=0.5,
                             ridge=1e-9)
    assert report["heldout"]["rel_error_stage1"]["k"] < 1e-6
    ids = torch.randint(3, 250, (2, 120))  # calibration used positions < 64
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ref = model(ids, attention_mask=mask).logits
    for fast in (False, True):
        logits, _ = _decode_steps(model, MixCodec(net, model), ids, 90, fast, mask)
        assert torch.allclose(logits[0], ref[0], atol=1e-3), fast
        assert torch.allclose(logits[1, 7:], ref[1, 7:], atol=1e-3), fast


@pytest.mark.parametrize("variant", ["mix", "heads"])
def test_mid_sequence_switch_keeps_the_prefix_and_fast_equals_explicit(variant):
    model = tiny_model("llama")
    net, _ = train_tiny(model, steps=2, variant=variant, compression_ratio=0.5, group_size=2)
    ids = torch.randint(3, 250, (2, 40))
    full = model(ids).logits
    got = {fast: _decode_steps(model, MixCodec(net, model), ids, 25, fast)[0] for fast in (False, True)}
    assert torch.equal(got[False][:, :25], full[:, :25]) or torch.allclose(got[False][:, :25], full[:, :25], atol=1e-6)
    assert torch.allclose(got[True], got[False], atol=1e-4)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_quantized_storage_bytes_equal_the_accounting(ratio):
    model = tiny_model("llama", dtype=torch.bfloat16)
    net, report = train_tiny(model, steps=0, variant="mix", compression_ratio=ratio, group_size=2)
    assert report["kept_fraction"] == pytest.approx(1 - ratio, abs=0.02)
    ids = torch.randint(3, 250, (1, 48))
    _, cache = _decode_steps(model, MixCodec(net, model), ids, 40, fast=True)
    assert cache.kept_fraction() == pytest.approx(net.layout.kept_fraction(), abs=1e-9)
    assert report["width_counts"]["4"] + report["width_counts"]["8"] > 0


def test_decoding_holds_one_groups_dequantized_components_at_a_time():
    """The dequantized components are a step's workspace: keeping every group's would hold a second, wider copy
    of the compressed cache."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    net, _ = train_tiny(model, steps=0, variant="mix", compression_ratio=0.5, group_size=1)
    codec = MixCodec(net, model)
    assert len(codec.groups) > 1
    _, cache = _decode_steps(model, codec, torch.randint(3, 250, (1, 30)), 10, fast=True)
    assert {group for group, _ in codec._memo} == {len(codec.groups) - 1}
    pieces = [z for entry in codec._memo.values() for z, _, _ in entry[2]]
    # at most K and V of one layer (group size 1), however many components each keeps
    geo = cache.geometry
    assert sum(z.numel() for z in pieces) <= 2 * cache.stores[-1].n_tokens * geo.head_dim * geo.num_kv_heads


# -- bad input, before any work ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, message", [
    ({"variant": "mix", "widths": "2"}, "choose 'auto'"),
    ({"variant": "mix", "widths": "int8"}, "choose 'auto'"),
    ({"variant": "heads", "compression_ratio": 0.62, "group_size": 4}, "nearest reachable ratios"),
])
def test_bad_settings_are_refused_before_calibration(cfg, message, monkeypatch):
    import echokv.training as mt

    def boom(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(mt, "collect", boom)
    model = tiny_model("llama", num_hidden_layers=4, num_key_value_heads=1, num_attention_heads=2)
    with pytest.raises(ValueError, match=message):
        mt.train(model, None, TrainConfig(progress=False, **cfg), torch.zeros(2, 8, dtype=torch.long),
                       torch.zeros(1, 8, dtype=torch.long))


def test_a_float32_cache_cannot_keep_more_than_16_bit_components():
    from echokv.training import check_reachable

    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"32-bit cache\): it would keep 0.50.*nearest reachable ratios: .*0.5"):
        check_reachable(model, TrainConfig(variant="mix", compression_ratio=0.2))


def test_stage2_keeps_the_best_held_out_state_and_never_worsens_it():
    model = tiny_model("llama")
    _net, report = train_tiny(model, steps=10, variant="mix", compression_ratio=0.75, group_size=2,
                             stage2_eval_every=5, stage2_lr=0.5)  # a learning rate that overshoots
    curve = report["stage2"]["heldout_output_error_curve"]
    assert [s for s, _ in curve] == [0, 5, 10]
    assert report["stage2"]["omse_after"] == min(e for _, e in curve) <= curve[0][1]
