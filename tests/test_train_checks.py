"""Requests a layout cannot meet are refused before calibration, naming what would happen (issue #16, item 3).

On SmolLM2-135M's geometry (30 layers, 3 KV heads, head_dim 64), built on the meta device: no weights needed."""

from __future__ import annotations

import pytest
import torch

from echokv.config import TrainConfig
from echokv.training import check_reachable, planned_kept, validate


@pytest.fixture(scope="module")
def smollm2_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                      intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize(("settings", "match"), [
    # (the paper layout of the hybrid reaches 0.5 since its S follows the values; with S = 1 it keeps every value)
    ({"variant": "hybrid", "layout": "paper", "group_size": 1}, r"V 1.000\), nothing of the keys to rebuild from"),
    ({"variant": "heads", "keys": "rope-commuting"}, r"--keys rope-commuting was retired"),
    ({"variant": "hybrid", "compression_ratio": 0.999}, r"V 0.000\), nothing of the values .* nearest reachable ratios: 0.97, 0.98"),
    ({"variant": "hybrid", "k_ratio": 0.0, "v_ratio": 0.0}, r"compress the cache by 0, not by --compression-ratio 0.5"),
    ({"layout": "paper"}, r"apply to the heads and hybrid variants, not to mix"),
], ids=["hybrid-paper", "retired-keys", "hybrid-0.999", "kv-ratios-0", "mix-paper"])
def test_unreachable_requests_are_refused(smollm2_shape, settings, match):
    with pytest.raises(ValueError, match=match):
        validate(TrainConfig(**settings), smollm2_shape)


@pytest.mark.parametrize("settings", [
    {"variant": "hybrid"}, {"variant": "heads"}, {}, {"variant": "hybrid", "compression_ratio": 0.7},
    {"variant": "heads", "k_ratio": 0.4, "v_ratio": 0.6}, {"variant": "hybrid", "k_ratio": 0.4, "v_ratio": 0.6},
])
def test_reachable_requests_pass_and_keep_what_they_say(smollm2_shape, settings):
    cfg = TrainConfig(**settings)
    validate(cfg, smollm2_shape)
    check_reachable(smollm2_shape, cfg)
    kk, kv = planned_kept(smollm2_shape, cfg)
    assert abs((kk + kv) / 2 - (1 - cfg.compression_ratio)) <= 0.02


def test_one_kind_ratio_leaves_the_other_the_rest_of_the_budget():
    assert TrainConfig(k_ratio=0.25).ratios() == (0.25, 0.75)
    assert TrainConfig(v_ratio=0.6, compression_ratio=0.5).ratios() == (0.4, 0.6)
    with pytest.raises(ValueError, match="leave the other kind a ratio of -0.35"):
        TrainConfig(k_ratio=0.95, compression_ratio=0.3).ratios()


# -- one plan for every (variant, layout) pair the configuration accepts (issue #29) -------------------------------
OPTIONS = {
    "variant": ["mix", "heads", "hybrid"],
    "layout": ["data", "paper"],
    "compression_ratio": [0.0, 0.3, 0.5, 0.7, 0.9],
    "group_size": [None, 2],
}


def _product():
    import itertools

    for values in itertools.product(*OPTIONS.values()):
        yield dict(zip(OPTIONS, values))


@pytest.mark.parametrize("settings", list(_product()), ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_accepted_request_keeps_what_it_asks_and_every_refusal_names_reachable_ratios(smollm2_shape, settings):
    # `--variant heads --layout paper` passed with the data layout's budgets, then kept another fraction
    import re

    cfg = TrainConfig(**settings)
    try:
        validate(cfg, smollm2_shape)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message
        found = re.search(r"nearest reachable ratios: ([0-9., ]+)", message)
        if found is None:  # a setting that is refused whatever the ratio
            assert "not to mix" in message or "no ratio is reachable" in message, message
            return
        near = [float(x) for x in found.group(1).split(", ")]
        assert near and all(r != cfg.compression_ratio for r in near)
        for r in near:  # each ratio it names passes, and keeps what it says
            ok = TrainConfig(**{**settings, "compression_ratio": r})
            validate(ok, smollm2_shape)
            assert abs(sum(planned_kept(smollm2_shape, ok)) / 2 - (1 - r)) <= 0.02
        return
    kk, kv = planned_kept(smollm2_shape, cfg)
    assert abs((kk + kv) / 2 - (1 - cfg.compression_ratio)) <= 0.02 and min(kk, kv) > 0


@pytest.mark.parametrize("settings", [
    {"variant": "heads", "layout": "paper", "compression_ratio": 0.75},
    {"variant": "hybrid", "compression_ratio": 0.7},
    {"variant": "hybrid", "layout": "paper", "compression_ratio": 0.7},  # (float32: components keep <= 0.5)
    {"variant": "heads", "compression_ratio": 0.5},
    {"variant": "mix", "compression_ratio": 0.75},
])
def test_the_plan_is_what_training_stores(settings):
    from echokv.tiny import tiny_model
    from echokv.training import train

    model = tiny_model("llama", num_hidden_layers=8)
    cfg = TrainConfig(stage2_steps=0, progress=False, **settings)
    kk, kv = planned_kept(model, cfg)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(3, 250, (8, 64), generator=g), torch.randint(3, 250, (4, 64), generator=g)
    _, report = train(model, None, cfg, calib=calib, held=held)
    assert abs(report["kept_fraction"] - (kk + kv) / 2) <= 0.01, (report["kept_fraction"], kk, kv)
