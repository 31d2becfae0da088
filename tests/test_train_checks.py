"""Requests a layout cannot meet are refused before calibration, naming what would happen (issue #16, item 3).

On SmolLM2-135M's geometry (30 layers, 3 KV heads, head_dim 64), built on the meta device: no weights needed."""

from __future__ import annotations

import pytest
import torch

from echokv.config import TrainConfig
from echokv.training import check_reachable, planned_kept


@pytest.fixture(scope="module")
def smollm2_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                      intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize(("settings", "match"), [
    ({"variant": "hybrid", "layout": "paper"}, r"\(K 0.000, V 1.000\), nothing of the keys to rebuild from"),
    ({"variant": "heads", "keys": "rope-commuting", "layout": "paper", "group_size": 1},
     r"would keep 1.000 of the cache"),
    ({"variant": "hybrid", "compression_ratio": 0.999}, r"V 0.000\), nothing of the values .* nearest reachable ratios: 0.97, 0.98"),
    ({"variant": "hybrid", "k_ratio": 0.0, "v_ratio": 0.0}, r"compress the cache by 0, not by --compression-ratio 0.5"),
    ({"layout": "paper"}, r"apply to the heads and hybrid variants, not to mix"),
], ids=["hybrid-paper", "paper-S1", "hybrid-0.999", "kv-ratios-0", "mix-paper"])
def test_unreachable_requests_are_refused(smollm2_shape, settings, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**settings).validate(smollm2_shape)


@pytest.mark.parametrize("settings", [
    {"variant": "hybrid"}, {"variant": "heads", "keys": "rope-commuting"}, {"variant": "heads"}, {},
    {"variant": "hybrid", "compression_ratio": 0.7}, {"variant": "heads", "keys": "rope-commuting", "k_ratio": 0.4,
                                                      "v_ratio": 0.6},
])
def test_reachable_requests_pass_and_keep_what_they_say(smollm2_shape, settings):
    cfg = TrainConfig(**settings)
    cfg.validate(smollm2_shape)
    if not cfg.retains_components:
        check_reachable(smollm2_shape, cfg)
        kk, kv = planned_kept(cfg, smollm2_shape)
        assert abs((kk + kv) / 2 - (1 - cfg.compression_ratio)) <= 0.02


def test_one_kind_ratio_leaves_the_other_the_rest_of_the_budget():
    assert TrainConfig(k_ratio=0.25).ratios() == (0.25, 0.75)
    assert TrainConfig(v_ratio=0.6, compression_ratio=0.5).ratios() == (0.4, 0.6)
    with pytest.raises(ValueError, match="leave the other kind a ratio of -0.35"):
        TrainConfig(k_ratio=0.95, compression_ratio=0.3).ratios()
