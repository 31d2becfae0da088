"""Baselines (headdrop, lowrank, xlayer-svd, quant) on tiny random models: exactness, bytes, fills."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from echokv.cache import CompressedCache
from echokv.codecs.quant import QuantCodec, dequantize, quantize
from echokv.generation import prefill
from echokv.selection import paper_options
from echokv.stats.collect import BASELINE_FEATURES, Calibration, collect
from echokv.stats.rope import Rope, rotate, unrotate
from echokv.tiny import tiny_model
from echokv_lab.methods import make_method
from echokv_lab.methods.base import Method
from echokv_lab.methods.headdrop import HeadDropMethod
from echokv_lab.methods.lowrank import LowRankMethod, allocate_ranks
from echokv_lab.methods.quant import QuantMethod, kept_fraction
from echokv_lab.methods.xlayer_svd import CrossLayerSVDMethod

FACTORIES = {
    "headdrop": lambda r: HeadDropMethod(r),
    "headdrop-zero": lambda r: HeadDropMethod(r, fill="zero"),
    "lowrank": lambda r: LowRankMethod(r),
    "lowrank-post": lambda r: LowRankMethod(r, keys="post_rope"),
    "lowrank-uniform-perhead": lambda r: LowRankMethod(r, allocation="uniform", head_group=1),
    "lowrank-raw": lambda r: LowRankMethod(r, center=False),
    "xlayer-svd": lambda r: CrossLayerSVDMethod(r, group_size=2),
    "quant": lambda r: QuantMethod(r),
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def gemma3():
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return Calibration(blocks=torch.randint(3, 256, (4, 48), generator=g))


def _ids(n, seed=1):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _prepared(factory, ratio, model, calib):
    meth = factory(ratio)
    meth.prepare(model, None, calib)
    return meth


@torch.no_grad()
def _run(meth, model, ids, split=40):
    """Prefill ``ids[:split]`` in chunks, compress, feed the rest in odd chunks; last logits + report."""
    cache = meth.new_cache(model)
    prefill(model, cache, ids[:, :split], chunk_size=16)
    cache.compress()
    logits = prefill(model, cache, ids[:, split:], chunk_size=7)
    return logits[0], cache.memory_report()


# -- ratio 0 / full rank: exact -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "which,arch",
    [(w, "llama") for w in FACTORIES] + [(w, "gemma3") for w in ("headdrop", "lowrank", "xlayer-svd", "quant")],
)
def test_ratio_zero_equals_full(which, arch, llama, gemma3, calib):
    model = llama if arch == "llama" else gemma3
    meth = _prepared(FACTORIES[which], 0.0, model, calib)
    ids = _ids(60)
    ref = model(input_ids=ids).logits[0, -1]
    logits, rep = _run(meth, model, ids)
    assert torch.allclose(logits, ref, atol=2e-5, rtol=1e-5), (logits - ref).abs().max()
    assert rep["mode"] == "compressed" and rep["kept_fraction"] == pytest.approx(1.0)
    assert meth.achieved_kept_fraction == 1.0


@pytest.mark.parametrize("which", ["lowrank", "xlayer-svd", "quant", "headdrop"])
def test_ratio_zero_generate_and_nll_match_full(which, llama, calib):
    meth = _prepared(FACTORIES[which], 0.0, llama, calib)
    ids = _ids(70, seed=3)
    full = Method(0.0)
    ctx, q = ids[0, :50].tolist(), ids[0, 50:56].tolist()
    assert meth.generate(llama, ctx, q, 6)[0] == full.generate(llama, ctx, q, 6)[0]
    # nll compresses after every chunk: several encodes, so pre-RoPE positions must follow the stream
    tot, cnt, rep = meth.nll(llama, ids, chunk_size=16)
    ref_tot, ref_cnt, _ = full.nll(llama, ids, chunk_size=16)
    assert cnt == ref_cnt and tot == pytest.approx(ref_tot, rel=1e-5)
    assert rep["kept_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [LowRankMethod, CrossLayerSVDMethod])
def test_full_rank_exact_with_full_window(cls, llama, calib):
    """Full rank through a cache that keeps a recent window: partial flushes, positions still right."""
    meth = cls(0.0)
    meth.prepare(llama, None, calib)
    assert all(b.rank == b.dims for b in meth.bases)
    ids = _ids(64, seed=5)
    ref = llama(input_ids=ids).logits[0]
    cache = CompressedCache(llama, meth.make_codec(llama), mode="compressed", full_window=5)
    out = [prefill(llama, cache, ids[:, s : s + 9], chunk_size=9) for s in range(0, 63, 9)]
    out.append(prefill(llama, cache, ids[:, 63:], chunk_size=1))
    assert torch.allclose(out[-1][0], ref[-1], atol=2e-5), (out[-1][0] - ref[-1]).abs().max()
    assert cache.layers[0].store.n_tokens == 64 - 5


# -- pre-RoPE keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_unrotated_cache_keys_are_the_pre_rope_projection(arch, llama, gemma3):
    """Undoing RoPE on the cached keys gives the keys before RoPE (k_proj, then k_norm where there is one)."""
    model = llama if arch == "llama" else gemma3
    from echokv.stats.capture import attention_modules

    pre, hooks, n_tokens = {}, [], 30
    for idx, mod in attention_modules(model).items():
        sub = getattr(mod, "k_norm", None) or mod.k_proj

        def hook(m, inp, out, idx=idx, mod=mod):  # k_proj: [B, T, H*d]; k_norm: [B, T, H, d] or [B, H, T, d]
            if out.dim() == 3 or out.shape[1] == n_tokens:
                out = out.reshape(out.shape[0], n_tokens, -1, mod.head_dim).transpose(1, 2)
            pre[idx] = out

        hooks.append(sub.register_forward_hook(hook))
    try:
        cache = DynamicCache(config=model.config)
        ids = _ids(n_tokens, seed=7)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    from echokv.models import kv_geometry

    for layer in kv_geometry(model).full_attention_layers:
        k = cache.layers[layer].keys
        cos, sin = Rope(model, layer).table(k.shape[2], k.device)
        assert torch.allclose(unrotate(k, cos, sin), pre[layer], atol=1e-5)
        assert torch.allclose(rotate(pre[layer], cos, sin), k, atol=1e-5)
        # positions after an offset: the same slice of the table
        c2, s2 = Rope(model, layer).at(10, 5, k.device)
        assert torch.allclose(unrotate(k[:, :, 10:15], c2, s2), pre[layer][:, :, 10:15], atol=1e-5)


# -- kept bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lowrank", "lowrank-post", "lowrank-uniform-perhead", "xlayer-svd"])
@pytest.mark.parametrize("ratio", [0.3, 0.75, 0.9])
def test_lowrank_kept_bytes(which, ratio, llama, calib):
    meth = _prepared(FACTORIES[which], ratio, llama, calib)
    _, rep = _run(meth, llama, _ids(50))
    # what the cache measures is what the method reports
    assert rep["kept_fraction"] == pytest.approx(meth.achieved_kept_fraction, abs=1e-12)
    target = 1 - ratio
    n_bases = len(meth.bases)
    # greedy: exactly round(kept * dims) latent dims; uniform: one rounding per basis
    tol = 0.5 * meth.kept_step * (1 if meth.allocation == "greedy" else n_bases) + 1e-12
    assert abs(meth.achieved_kept_fraction - target) <= tol
    assert rep["cache_bytes"] == pytest.approx(rep["full_cache_bytes"] * meth.achieved_kept_fraction)
    assert meth.parameter_bytes() > 0


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_headdrop_kept_bytes_is_the_nearest_paper_layout(ratio, llama, calib):
    meth = _prepared(FACTORIES["headdrop"], ratio, llama, calib)
    _, rep = _run(meth, llama, _ids(50))
    assert rep["kept_fraction"] == pytest.approx(meth.achieved_kept_fraction, abs=1e-12)
    opts = [o["kept_fraction"] for o in paper_options(list(range(4)), 2)]
    best = min(abs(k - (1 - ratio)) for k in opts)
    assert abs(meth.achieved_kept_fraction - (1 - ratio)) == pytest.approx(best, abs=1e-12)


def test_headdrop_keeps_the_retained_heads_of_an_echo_artifact(llama, calib, tmp_path):
    # the ablation of EchoKV: its retained heads, no network; eval hands headdrop the run's echo artifact
    from echokv import artifact
    from echokv_lab.methods.headdrop import head_layout
    from helpers import train_tiny

    echo, report = train_tiny(llama, steps=1, compression_ratio=0.5, variant="heads")  # data layout (default)
    path = str(artifact.save(echo, llama, tmp_path / "heads-0.5", report))
    meth = make_method("headdrop", 0.5, [path])
    assert meth.artifact == path
    meth.prepare(llama, None, calib)
    heads = head_layout(echo.layout)  # the artifact's selections as (layer, head) pairs
    assert meth.layout.retained_k == heads.retained_k and meth.layout.retained_v == heads.retained_v
    _, rep = _run(meth, llama, _ids(50))
    assert rep["kept_fraction"] == pytest.approx(heads.kept_fraction(), abs=1e-12)
    assert meth.info()["layout"] == "artifact"  # the heads of the run's artifact
    assert make_method("headdrop", 0.7, [path]).artifact is None  # another ratio: the paper layout

    hybrid, report = train_tiny(llama, steps=1, compression_ratio=0.7, variant="hybrid")
    hpath = str(artifact.save(hybrid, llama, tmp_path / "hybrid-0.7", report))
    assert make_method("headdrop", 0.7, [hpath]).artifact is None
    with pytest.raises(ValueError, match="head-only artifact"):
        HeadDropMethod(0.7, artifact=hpath)


@pytest.mark.parametrize(("ratio", "dtype", "bits"), [
    (0.5, torch.bfloat16, 8), (0.75, torch.bfloat16, 4), (0.875, torch.bfloat16, 2), (0.7, torch.bfloat16, 4),
    (0.3, torch.bfloat16, 8), (0.9, torch.bfloat16, 1),
    (0.5, torch.float32, 16), (0.75, torch.float32, 8), (0.875, torch.float32, 4), (0.3, torch.float32, 16),
])
def test_quant_bits_from_the_ratio_and_measured_bytes(ratio, dtype, bits, calib):
    """The codes fill the budget, scales come on top: bf16 at 0.5 is 8 bits, measured bytes say the same."""
    model = tiny_model("llama", dtype=dtype)
    meth = _prepared(FACTORIES["quant"], ratio, model, calib)
    assert meth.info()["bits"] == bits
    _, rep = _run(meth, model, _ids(50))
    assert rep["kept_fraction"] == pytest.approx(meth.achieved_kept_fraction, abs=1e-12)
    element = 2 if dtype == torch.bfloat16 else 4
    assert bits / (8 * element) <= 1 - ratio  # the codes fit the budget
    assert bits == 16 or 2 * bits / (8 * element) > 1 - ratio  # and are the widest that fits
    assert bits / (8 * element) < rep["kept_fraction"] or bits == 16  # scales and zero points on top (16: a copy)
    assert rep["kept_fraction"] - bits / (8 * element) <= 4 / (16 * element) + 1e-12  # fp16 scale+zero per group


def test_quant_beyond_one_bit_cannot_be_reached(calib):
    from echokv_lab.methods import MethodUnavailable

    model = tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(MethodUnavailable, match="cannot reach ratio 0.95"):
        _prepared(FACTORIES["quant"], 0.95, model, calib)


def test_quant_kept_fraction_formula():
    # float32, groups of 32: 16 bit = half; 8 bit + two fp16 per group; 4 bit packs two per byte
    assert kept_fraction(16, 4, 32) == 0.5
    assert kept_fraction(8, 4, 32) == pytest.approx((32 + 4) / 128)
    assert kept_fraction(4, 4, 32) == pytest.approx((16 + 4) / 128)
    assert kept_fraction(8, 2, 32) == pytest.approx((32 + 4) / 64)
    assert kept_fraction(None, 4, 32) == 1.0


# -- quantization round trip --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group", [16, 32])
def test_quant_round_trip_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 37, 64, generator=g) * torch.logspace(-2, 2, 64)  # channels of very different scale
    s = quantize(x, bits, group)
    assert s["q"].dtype == torch.uint8 and s["q"].shape[-1] == 64 * bits // 8  # packed: real bytes
    assert s["s"].dtype == torch.float16 and s["s"].shape[-1] == 64 // group
    y = dequantize(s, bits, group, torch.float32)
    step = s["s"].float().repeat_interleave(group, dim=-1)
    err = (y - x).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all(), (err / step).max()


def test_quant_constant_groups_are_exact():
    x = torch.full((1, 1, 4, 32), 0.3)
    for bits in (1, 4, 8):
        y = dequantize(quantize(x, bits, 32), bits, 32, torch.float32)
        assert torch.allclose(y, x.half().float(), atol=1e-3)


def test_quant_codec_16_bit_and_8_bit():
    x = torch.randn(1, 2, 10, 16)
    for bits, tol in ((16, 2**-11), (8, 1 / 255)):
        codec = QuantCodec([0], bits, 16, torch.float32)
        st = codec.encode(0, [x], [x])
        k, v = codec.decode(0, st)
        span = x.abs().max() * 2 if bits == 8 else x.abs()
        assert ((k - x).abs() <= span * tol + 1e-7).all() and torch.equal(k, v)


# -- headdrop fills -----------------------------------------------------------------------------------
def test_headdrop_fills_discarded_heads(llama, calib):
    mean = _prepared(FACTORIES["headdrop"], 0.5, llama, calib)
    zero = _prepared(FACTORIES["headdrop-zero"], 0.5, llama, calib)
    assert mean.layout.retained_k == zero.layout.retained_k
    cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(input_ids=_ids(20), past_key_values=cache, use_cache=True)
    keys = {i: cache.layers[i].keys for i in range(4)}
    values = {i: cache.layers[i].values for i in range(4)}
    cm, cz = mean.make_codec(llama), zero.make_codec(llama)
    assert cm.groups == [[0], [1], [2], [3]]  # one layer per group: group g is layer g
    n_dropped = 0
    for layer in range(4):
        sm = cm.encode(layer, [keys[layer]], [values[layer]])
        sz = cz.encode(layer, [keys[layer]], [values[layer]])
        for (km, vm), (kz, vz) in [(cm.decode(layer, sm), cz.decode(layer, sz))]:
            for kind, xm, xz, ref in (("k", km, kz, keys[layer]), ("v", vm, vz, values[layer])):
                kept = mean.layout.retained_in_layer(kind, layer)
                drop = [h for h in range(2) if h not in kept]
                assert torch.equal(xm[:, kept], ref[:, kept]) and torch.equal(xz[:, kept], ref[:, kept])
                if drop:
                    n_dropped += 1
                    mu = mean.means[kind][layer][drop]
                    assert torch.allclose(xm[:, drop], mu[None, :, None, :].expand_as(xm[:, drop]))
                    assert torch.count_nonzero(xz[:, drop]) == 0
                    assert not torch.allclose(xm[:, drop], xz[:, drop])
    assert n_dropped > 0
    # the two fills give different logits, both different from the full cache
    ids = _ids(50, seed=2)
    lm, _ = _run(mean, llama, ids)
    lz, _ = _run(zero, llama, ids)
    ref = llama(input_ids=ids).logits[0, -1]
    assert not torch.allclose(lm, lz, atol=1e-4) and not torch.allclose(lm, ref, atol=1e-4)


def test_headdrop_zero_needs_no_calibration(llama):
    meth = HeadDropMethod(0.5, fill="zero")
    meth.prepare(llama, None, None)
    assert meth.parameter_bytes() == 0
    with pytest.raises(ValueError, match="calibration"):
        HeadDropMethod(0.5).prepare(llama, None, None)
    with pytest.raises(ValueError, match="fill"):
        HeadDropMethod(0.5, fill="median")


# -- rank allocation, registry ------------------------------------------------------------------------
def test_allocate_ranks():
    spectra = [torch.tensor([8.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    ranks = allocate_ranks(spectra, 0.5, "greedy")
    assert ranks == [1, 3]  # relative: 0.8 first, then the flat spectrum (0.25 each) beats 0.1
    assert allocate_ranks(spectra, 1.0) == [4, 4] and allocate_ranks(spectra, 0.0) == [0, 0]
    assert allocate_ranks(spectra, 0.5, "uniform") == [2, 2]
    with pytest.raises(ValueError):
        allocate_ranks(spectra, 0.5, "fisher")


def test_lowrank_lower_error_with_more_rank(llama, calib):
    ids = _ids(60, seed=9)
    ref = llama(input_ids=ids).logits[0, -1]
    errs = []
    for r in (0.2, 0.5, 0.8):
        logits, _ = _run(_prepared(FACTORIES["lowrank"], r, llama, calib), llama, ids)
        errs.append(float((logits - ref).abs().max().detach()))
    assert errs[0] < errs[2] and all(math.isfinite(e) for e in errs)


def test_registry_and_make_method():
    baselines = {"headdrop": HeadDropMethod, "lowrank": LowRankMethod, "xlayer-svd": CrossLayerSVDMethod,
                 "quant": QuantMethod}
    for name, cls in baselines.items():
        meth = make_method(name, 0.5)
        assert type(meth) is cls and meth.name == name and meth.label == f"{name}@0.5"


def test_bad_parameters(llama, calib):
    with pytest.raises(ValueError, match="head_group"):
        LowRankMethod(0.5, head_group=3).prepare(llama, None, calib)
    with pytest.raises(ValueError, match="key space"):
        LowRankMethod(0.5, keys="rope").prepare(llama, None, calib)
    with pytest.raises(ValueError, match="bits"):
        QuantMethod(0.5, bits=3)
    with pytest.raises(ValueError, match="calibration"):
        LowRankMethod(0.5).prepare(llama, None, None)


def test_group_moments_share_one_capture(llama):
    """Per-layer statistics sliced from a cross-layer capture equal a per-layer capture."""
    blocks = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    shared = Calibration(blocks=blocks)
    shared.group_moments(llama, [[0, 1], [2, 3]], progress=False)
    assert len(shared.cache) == 1
    sliced = shared.group_moments(llama, [[1], [2]], progress=False)
    assert len(shared.cache) == 1  # answered from the first pass
    ref = collect(llama, blocks, [[1], [2]], BASELINE_FEATURES, progress=False).moments
    for kind in ("k_post", "k_pre", "v"):
        for a, b in zip(sliced[kind], ref[kind]):
            assert a.count == b.count
            assert torch.allclose(a.total, b.total) and torch.allclose(a.outer, b.outer, atol=1e-9)


# -- two bugs found by reading (issue #25) -------------------------------------------------------------
@pytest.mark.parametrize("which", ["lowrank", "xlayer-svd"])
def test_a_reset_cache_encodes_a_new_prompt_as_a_fresh_one_does(which, llama, calib):
    """A projection of pre-RoPE keys un-rotates each block at its slots: after ``reset`` the slots start at 0 again
    (the codec kept an offset per group that a reset left behind)."""
    meth = _prepared(FACTORIES[which], 0.5, llama, calib)
    ids = _ids(48, seed=7)
    fresh, _ = _run(meth, llama, ids)
    cache = meth.new_cache(llama)
    with torch.no_grad():
        prefill(llama, cache, _ids(40, seed=8), chunk_size=16)
        cache.compress()
        cache.reset()
        prefill(llama, cache, ids[:, :40], chunk_size=16)
        cache.compress()
        again = prefill(llama, cache, ids[:, 40:], chunk_size=7)[0]
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)


def test_headdrop_reads_the_retained_heads_of_a_heads_artifact(llama, calib, tmp_path):
    from echokv.artifact import save
    from helpers import train_tiny

    net, _ = train_tiny(llama, steps=1, compression_ratio=0.5, variant="heads", keys="pre-rope")
    save(net, llama, tmp_path / "H")
    meth = HeadDropMethod(0.5, artifact=str(tmp_path / "H"))
    meth.prepare(llama, None, calib)
    for part in net.layout.parts:  # the same heads as the artifact's selection
        h = net.layout.num_kv_heads
        want = sorted((part.layers[i // h], i % h) for i in part.selection)
        got = sorted(head for head in meth.layout.retained(part.kind) if head[0] in part.layers)
        assert got == want
    logits, report = _run(meth, llama, _ids(48))
    assert torch.isfinite(logits).all() and 0.45 < report["kept_fraction"] < 0.6
