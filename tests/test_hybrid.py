"""EchoKV-Hybrid: keys as a RoPE-commuting latent per group, values rebuilt by Echo."""

from __future__ import annotations

import pytest
import torch

from echokv import artifact, key_latent
from echokv.cache import EchoKVCache, echokv_attention
from echokv.tiny import tiny_model
from echokv.training import TrainConfig
from helpers import train_tiny


def _rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, n, d] at positions pos [T]."""
    ang = pos[:, None].float() * inv_freq[None]  # [T, F]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def test_key_latent_commutes_with_rope():
    """Projecting then rotating equals rotating then projecting, at positions never calibrated."""
    from echokv import key_latent

    model = tiny_model("llama")
    recon, _ = train_tiny(model, steps=0, variant="hybrid", compression_ratio=0.5)
    basis = recon.groups[0].k_basis
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)  # orthonormal
    n, d = basis.shape[0] // model.config.head_dim, model.config.head_dim
    x = torch.randn(50, n, d)
    pos = torch.randint(0, 100_000, (50,))
    inv = model.model.rotary_emb.inv_freq

    def project(k):  # [T, n, d] -> the same, through the latent
        return key_latent.decode(key_latent.encode(k.permute(1, 0, 2)[None], basis), basis, d)[0].permute(1, 0, 2)

    a = project(_rope(x, pos, inv))
    b = _rope(project(x), pos, inv)
    assert torch.allclose(a, b, atol=1e-4)


def test_full_rank_hybrid_equals_the_full_cache():
    model = tiny_model("llama")
    recon, report = train_tiny(model, steps=0, variant="hybrid", compression_ratio=0.0)
    assert report["kept_fraction"] == 1.0
    ids = torch.randint(3, 250, (1, 24))
    ref = model(ids).logits
    for fast in (False, True):
        cache = EchoKVCache(model, recon, mode="compressed", fast=fast)
        with echokv_attention(model):
            out = torch.cat([model(ids[:, s : s + 5], past_key_values=cache).logits for s in range(0, 24, 5)], 1)
        assert torch.allclose(out, ref, atol=1e-4), fast


@pytest.mark.parametrize("ratio, k_ratio", [(0.5, None), (0.7, None), (0.5, 0.25)])
def test_hybrid_kept_fraction_is_exact_and_measured(ratio, k_ratio):
    model = tiny_model("llama")
    recon, report = train_tiny(model, steps=0, variant="hybrid", compression_ratio=ratio, k_ratio=k_ratio)
    lay = recon.layout
    step = 2 / (lay.num_kv_heads * len(lay.groups[0]) * lay.head_dim)  # one complex component per group
    rk, rv = TrainConfig(compression_ratio=ratio, k_ratio=k_ratio, variant="hybrid").ratios()
    heads = lay.total_heads
    assert lay.hybrid and len(lay.retained_v) == round((1 - rv) * heads)  # values: whole heads
    if k_ratio is None:  # the default split favours keys, and keys absorb the values' rounding: the ratio holds
        assert report["kept_fraction_k"] > report["kept_fraction_v"]
        assert report["kept_fraction"] == pytest.approx(1 - ratio, abs=step / 2 + 1e-12)
    else:
        assert report["kept_fraction_k"] == pytest.approx(1 - rk, abs=step / 2 + 1e-12)
        assert report["kept_fraction"] == pytest.approx(1 - ratio, abs=step / 2 + 1 / heads)
    cache = EchoKVCache(model, recon, mode="compressed")
    model(torch.randint(3, 250, (1, 40)), past_key_values=cache)
    mem = cache.memory_report()
    assert mem["kept_fraction"] == pytest.approx(lay.kept_fraction(), abs=1e-9)
    held = sum(t.numel() * t.element_size() for store in cache.stores for t in store.tensors.values())
    assert mem["cache_bytes"] == held


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hybrid(request):
    model = tiny_model(request.param)
    recon, _ = train_tiny(model, steps=3, variant="hybrid", compression_ratio=0.5)
    return model, recon


def test_hybrid_fast_path_equals_explicit_with_padding(hybrid):
    model, recon = hybrid
    ids = torch.randint(3, 250, (2, 30))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    outs = []
    for fast in (False, True):
        cache = EchoKVCache(model, recon, mode="compressed", fast=fast)
        with echokv_attention(model):
            outs.append(torch.cat([
                model(ids[:, s : s + 7], attention_mask=mask[:, : s + 7], past_key_values=cache).logits
                for s in range(0, 30, 7)
            ], 1))
    assert torch.allclose(outs[0][mask.bool()], outs[1][mask.bool()], atol=1e-5, rtol=1e-4)


def test_hybrid_artifact_round_trip(tmp_path, hybrid):
    model, recon = hybrid
    artifact.save(recon, model, tmp_path / "h")
    loaded = artifact.load(tmp_path / "h", model)
    assert loaded.layout.hybrid and loaded.layout.key_latent == recon.layout.key_latent
    for name, t in recon.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    # the file holds each key basis in its complex form: n*r + r/2 numbers, not n*d*r
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "h" / artifact.WEIGHTS))
    assert not [n for n in stored if n.endswith("k_basis")]
    for g, mod in enumerate(recon.groups):
        n_d, r = mod.k_basis.shape
        axes = stored[f"groups.{g}.k_basis_axes"]
        assert axes.shape == (r // 2, n_d // recon.head_dim, 2)
        assert key_latent.stored_numel(mod.k_basis, recon.head_dim) == axes.numel() + r // 2 < mod.k_basis.numel() / 8
    if getattr(recon, "stage1_state", None) is not None:
        s1 = artifact.load(tmp_path / "h", model, stage=1)
        for name, t in recon.stage1_state.items():
            assert torch.equal(t, s1.state_dict()[name]), name
    ids = torch.randint(3, 250, (1, 20))
    with echokv_attention(model):
        a = model.generate(ids, max_new_tokens=8, do_sample=False,
                           past_key_values=EchoKVCache(model, recon, mode="compressed"))
        b = model.generate(ids, max_new_tokens=8, do_sample=False,
                           past_key_values=EchoKVCache(model, loaded, mode="compressed"))
    assert torch.equal(a, b)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        TrainConfig(variant="nope").validate(tiny_model())
