"""EchoKV-Hybrid in the one network: keys as learned components (before RoPE), values rebuilt from retained heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from echokv import artifact
from echokv.cache import echokv_attention
from echokv.codecs.mix import EchoKVCache
from echokv.config import TrainConfig
from echokv.tiny import tiny_model
from echokv.training import validate
from helpers import train_tiny

RETIRED = Path(__file__).parent / "data"


@pytest.mark.parametrize("ratio, k_ratio", [(0.6, None), (0.7, None), (0.625, 0.5)])
def test_hybrid_keeps_what_it_is_asked_and_the_cache_measures_it(ratio, k_ratio):
    # (a float32 model: components are kept at 16 bits at most, half of its cache, so keys reach at most 0.5)
    model = tiny_model("llama")
    recon, report = train_tiny(model, steps=0, variant="hybrid", compression_ratio=ratio, k_ratio=k_ratio)
    lay = recon.layout
    assert lay.variant == "hybrid"
    for part in lay.parts:  # keys are components, values whole retained heads at the cache's width
        assert (part.selection is None) == (part.kind == "k")
        if part.kind == "v":
            assert part.rank == len(part.selection) * lay.head_dim and set(part.widths) == {lay.element_bits}
    rk, rv = TrainConfig(compression_ratio=ratio, k_ratio=k_ratio, variant="hybrid").ratios()
    heads = len(lay.layers) * lay.num_kv_heads
    assert sum(len(lay.part(g, "v").selection) for g in range(len(lay.groups))) == round((1 - rv) * heads)
    if k_ratio is None:  # the default split favours keys, and keys absorb the values' rounding: the ratio holds
        assert report["kept_fraction_k"] > report["kept_fraction_v"]
        assert 1 - ratio - 0.01 <= report["kept_fraction"] <= 1 - ratio
    else:
        assert 1 - rk - 0.02 <= report["kept_fraction_k"] <= 1 - rk
    cache = EchoKVCache(model, recon, mode="compressed")
    model(torch.randint(3, 250, (1, 70)), past_key_values=cache)
    mem = cache.memory_report()
    assert mem["kept_fraction"] == pytest.approx(lay.kept_fraction(), abs=0.02)
    held = sum(t.numel() * t.element_size() for store in cache.stores for t in store.tensors.values())
    assert mem["cache_bytes"] == held


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hybrid(request):
    model = tiny_model(request.param)
    recon, report = train_tiny(model, steps=3, variant="hybrid", compression_ratio=0.7)
    return model, recon, report


def test_hybrid_fast_path_equals_explicit_with_padding(hybrid):
    model, recon, _ = hybrid
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
    assert torch.allclose(outs[0][mask.bool()], outs[1][mask.bool()], atol=1e-4, rtol=1e-4)


def test_hybrid_artifact_round_trip(tmp_path, hybrid):
    model, recon, report = hybrid
    artifact.save(recon, model, tmp_path / "h", report)
    config = artifact.read_config(tmp_path / "h")
    assert artifact.config_variant(config) == "hybrid"
    loaded = artifact.load(tmp_path / "h", model)
    assert loaded.layout.to_dict() == recon.layout.to_dict()
    for name, t in recon.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    ids = torch.randint(3, 250, (1, 20))
    with echokv_attention(model):
        a = model.generate(ids, max_new_tokens=8, do_sample=False,
                           past_key_values=EchoKVCache(model, recon, mode="compressed"))
        b = model.generate(ids, max_new_tokens=8, do_sample=False,
                           past_key_values=EchoKVCache(model, loaded, mode="compressed"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("folder, variant", [("artifact-0.1.0-hybrid", "hybrid"), ("artifact-0.1.0-echo", "heads")])
def test_an_artifact_of_a_retired_form_gets_one_line(folder, variant):
    """The RoPE-commuting retained heads and the key latent were retired: their artifacts are refused before any
    model is loaded, naming the command that trains the form that replaced them."""
    with pytest.raises(artifact.ArtifactError) as info:
        artifact.read_config(RETIRED / folder)
    message = str(info.value)
    assert "\n" not in message and "retired variant" in message
    assert f"`echokv train --variant {variant}`" in message


def test_retired_flags_are_refused_or_warned():
    model = tiny_model()
    with pytest.raises(ValueError, match="--keys rope-commuting was retired"):
        validate(TrainConfig(variant="heads", keys="rope-commuting"), model)
    with pytest.raises(ValueError, match="--inputs global was retired"):
        validate(TrainConfig(variant="heads", inputs="global"), model)
    with pytest.warns(FutureWarning, match="--keys is deprecated"):
        validate(TrainConfig(variant="heads", keys="pre-rope"), model)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        validate(TrainConfig(variant="nope"), tiny_model())
