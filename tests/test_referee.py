"""`echokv analyze --artifact`: the referee's analyses (issue #13, 8a-c) of a mixes artifact."""

from __future__ import annotations

import json

import pytest
import torch

from echokv import artifact
from echokv.cli import main
from echokv.tiny import tiny_model
from echokv_lab import referee
from helpers import train_tiny
from test_mixes import _full_rank_mixes


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    return tiny_model("llama", vocab_size=len(smollm2_tokenizer), dtype=torch.float32), smollm2_tokenizer


def test_an_exact_artifact_has_no_error_and_a_lossy_one_has_some(tiny, tmp_path):
    model, tok = tiny
    exact = artifact.save(_full_rank_mixes(model), model, tmp_path / "exact")
    lossy_net, report = train_tiny(model, steps=0, variant="mix", compression_ratio=0.875)
    lossy = artifact.save(lossy_net, model, tmp_path / "lossy", report)
    results = {name: referee.analyze(model, tok, path, seq_len=128, long_tokens=512, progress=False)
               for name, path in (("exact", exact), ("lossy", lossy))}
    for name, r in results.items():
        assert len(r["per_source"]) >= 4  # calibration held-out, evaluation prose, technical prose, code
        assert len(r["per_head"]["k"]) == model.config.num_hidden_layers
        assert all(len(row) == model.config.num_key_value_heads for row in r["per_head"]["v"])
        assert len(r["by_position"]["k"]) == r["by_position"]["tokens"] == 512
        worst = max(v["max"] for v in r["across_sources"].values())
        assert (worst < 1e-8) if name == "exact" else (worst > 1e-4), (name, worst)
    paths = referee.write(results["lossy"], tmp_path / "report")
    assert all(p.is_file() for p in paths)
    assert json.loads((tmp_path / "report" / referee.JSON_NAME).read_text())["variant"] == "mix"
    assert "(b) Across documents" in (tmp_path / "report" / referee.MD_NAME).read_text()


def test_every_variant_is_analysed_and_a_missing_artifact_is_refused(tiny, tmp_path, capsys):
    model, tok = tiny
    for variant, ratio in (("heads", 0.5), ("hybrid", 0.7)):  # (float32: the hybrid's keys keep at most half)
        net, report = train_tiny(model, steps=0, variant=variant, compression_ratio=ratio)
        path = artifact.save(net, model, tmp_path / variant, report)
        r = referee.analyze(model, tok, path, seq_len=128, long_tokens=256, progress=False)
        assert len(r["per_head"]["k"]) == model.config.num_hidden_layers and r["variant"] == variant
    assert main(["analyze", "--model", "tiny-llama", "--artifact", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "o").exists()
