"""The EchoKV method: selection, reconstruction, two-stage training, artifact."""

from __future__ import annotations

import json

import pytest
import torch

from echokv import artifact
from echokv.selection import data_layout, nearest_paper_layout, paper_layout, paper_options
from echokv.stats.moments import KeyMoments, ValueMoments
from echokv.tiny import tiny_model
from echokv.training import TrainConfig, validate
from helpers import exact_tiny_llama, one_head_layout, train_tiny


def test_exact_linear_head_is_reconstructed_to_machine_precision():
    model = exact_tiny_llama()
    _recon, report = train_tiny(model, one_head_layout(), steps=0, ridge=1e-9)
    assert report["heldout"]["rel_error_stage1"]["k"] < 1e-9
    assert report["heldout"]["rel_error_stage1"]["v"] < 1e-9
    assert report["stage2"]["omse_before"] < 1e-9


def test_paper_layout_keeps_first_layer_and_m_heads():
    lay = paper_layout(list(range(30)), 3, group_size=2, m=0)
    assert lay.kept_fraction() == pytest.approx(0.5)
    assert (0, 0) in lay.retained_k and (1, 0) not in lay.retained_k
    lay = paper_layout(list(range(30)), 3, group_size=4, m=1)
    assert lay.retained_in_layer("v", 1) == [0]


def test_paper_options_report_reachable_ratios():
    opts = paper_options(list(range(30)), 3)
    assert any(o["group_size"] == 2 and o["m"] == 0 and o["compression_ratio"] == 0.5 for o in opts)
    lay = nearest_paper_layout(list(range(30)), 3, 0.7)
    assert abs((1 - lay.kept_fraction()) - 0.7) <= min(abs(o["compression_ratio"] - 0.7) for o in opts) + 1e-12


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_data_layout_respects_the_ratio_exactly(ratio):
    layers, h, d = list(range(6)), 3, 8
    g = torch.Generator().manual_seed(0)
    stats = {"k": [], "v": []}
    for _ in range(3):  # groups of 2 layers
        km, vm = KeyMoments(6, d), ValueMoments(6, d)
        x = torch.randn(200, 6, d, generator=g)
        km.add(x)
        vm.add(x)
        stats["k"].append(km)
        stats["v"].append(vm)
    lay = data_layout(layers, h, 2, ratio, ratio, stats)
    total = len(layers) * h
    assert len(lay.retained_k) == round((1 - ratio) * total) == len(lay.retained_v)


def test_data_layout_picks_the_explanatory_head():
    """Head 1 is a copy of head 0 and head 2 is independent: keeping one of {0,1} and head 2 is best."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 1, 8, generator=g)
    x = torch.cat([base, base * 2, torch.randn(500, 1, 8, generator=g)], dim=1)
    vm, km = ValueMoments(3, 8), KeyMoments(3, 8)
    vm.add(x)
    km.add(x)
    lay = data_layout([0], 3, 1, 1 / 3, 1 / 3, {"k": [km], "v": [vm]})
    kept = {h for _, h in lay.retained_v}
    assert 2 in kept and len(kept & {0, 1}) == 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        validate(TrainConfig(compression_ratio=bad), tiny_model())


def test_group_size_and_m_that_do_not_fit():
    model = tiny_model()  # 4 layers, 2 KV heads
    with pytest.raises(ValueError, match="group size S=9 does not fit"):
        validate(TrainConfig(group_size=9), model)
    with pytest.raises(ValueError, match="local input size m=3 does not fit"):
        validate(TrainConfig(m=3), model)


def test_stage2_is_deterministic_with_a_seed():
    model = tiny_model()
    _, r1 = train_tiny(model, steps=4, seed=3)
    _, r2 = train_tiny(model, steps=4, seed=3)
    assert r1["stage2"]["train_losses"] == r2["stage2"]["train_losses"]
    _, r1 = train_tiny(model, steps=4, seed=3, variant="heads")
    _, r2 = train_tiny(model, steps=4, seed=3, variant="heads")
    assert r1["stage2"]["train_losses"] == r2["stage2"]["train_losses"]


def test_the_network_reports_its_size():
    recon, report = train_tiny(tiny_model(), steps=0)
    n = recon.num_parameters()
    assert n > 0 and report["network_bytes"] == 4 * n  # a float32 model's network: float32
    recon, report = train_tiny(tiny_model(dtype=torch.bfloat16), steps=0)
    n = recon.num_parameters()
    decoders = sum(p.numel() for name, p in recon.params.items() if name.endswith("_R"))
    assert n > decoders > 0 and report["network_bytes"] == 4 * n - 2 * decoders  # a 16-bit one's decoders: bf16


def test_the_decoders_are_stored_in_bfloat16_and_load_back_as_trained(tmp_path):
    from safetensors import safe_open

    model = tiny_model(dtype=torch.bfloat16)
    net, report = train_tiny(model, steps=2)
    artifact.save(net, model, tmp_path / "a", report)
    with safe_open(str(tmp_path / "a" / artifact.WEIGHTS), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    assert {d for n, d in dtypes.items() if n.endswith("_R")} == {"BF16"}
    assert {d for n, d in dtypes.items() if not n.endswith("_R")} == {"F32"}
    loaded = artifact.load(tmp_path / "a", model)
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in net.state_dict().items())  # rounded when trained
    # an artifact written before (float32 decoders) still loads
    artifact.save(net, model, tmp_path / "old", report)
    state = {n: t.float() for n, t in net.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "old" / artifact.WEIGHTS), metadata={"format": artifact.FORMAT + artifact.WITH_CHECKSUMS})
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["checksums"][artifact.WEIGHTS] = artifact.sha256_file(tmp_path / "old" / artifact.WEIGHTS)
    artifact.rewrite_config(tmp_path / "old", config)
    old = artifact.load(tmp_path / "old", model)
    assert all(torch.equal(t, old.state_dict()[n]) for n, t in net.state_dict().items())


def test_artifact_round_trip_gives_identical_tensors(tmp_path):
    model = tiny_model()
    recon, report = train_tiny(model, steps=2)
    artifact.save(recon, model, tmp_path / "a", report)
    loaded = artifact.load(tmp_path / "a", model)
    for name, t in recon.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    for key in ("kv_fingerprint", "geometry"):
        assert key in cfg["model"]
    assert cfg["layout"]["parts"] and cfg["layout"]["groups"] and cfg["versions"]["torch"]
    stage1 = artifact.load(tmp_path / "a", model, stage=1)
    assert any(not torch.equal(stage1.state_dict()[k], v) for k, v in loaded.state_dict().items()) or (
        report["stage2"]["reverted_to_stage1"] or report["stage2"].get("skipped")
    )


def test_artifact_for_another_model_is_refused(tmp_path):
    model = tiny_model(seed=0)
    recon, report = train_tiny(model, steps=0)
    artifact.save(recon, model, tmp_path / "a", report)
    with pytest.raises(artifact.ArtifactError, match="different model"):
        artifact.load(tmp_path / "a", tiny_model(seed=1))
    with pytest.raises(artifact.ArtifactError, match="num_layers=4, but this model has 6"):
        artifact.load(tmp_path / "a", tiny_model(num_hidden_layers=6))


def test_existing_output_is_not_overwritten(tmp_path):
    model = tiny_model()
    recon, report = train_tiny(model, steps=0)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        artifact.save(recon, model, tmp_path / "a", report)
    artifact.save(recon, model, tmp_path / "a", report, overwrite=True)
    assert (tmp_path / "a" / "config.json").exists()


def test_interrupted_save_leaves_no_complete_looking_artifact(tmp_path, monkeypatch):
    model = tiny_model()
    recon, report = train_tiny(model, steps=0)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        artifact.save(recon, model, tmp_path / "a", report)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_artifact_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(artifact.ArtifactError, match="network.safetensors is missing"):
        artifact.load(tmp_path / "a")


def test_text_too_short_is_refused_before_work(smollm2_tokenizer):
    from echokv.data import TextTooShortError, require_tokens

    with pytest.raises(TextTooShortError, match="tokens"):
        require_tokens(smollm2_tokenizer, "evaluation", 10**7, 512)


@pytest.mark.real_model
def test_real_model_train_report_and_stage2_gain(smollm2_artifact):
    report = json.loads((smollm2_artifact / "train_report.json").read_text())
    for key in ("kept_fraction", "total_seconds"):
        assert key in report
    assert report["kept_fraction"] == pytest.approx(0.5, abs=2e-3)  # the byte budget, positions included
    s2 = report["stage2"]
    assert {"seconds", "omse_before", "omse_after"} <= set(s2) and "final_loss" in report["stage1"]
    # held-out blocks of the calibration text, not the training batch; the best state is kept
    assert s2["omse_after"] <= s2["omse_before"]
    held = report["heldout"]
    assert held["rel_error_stage1"]["k"] < 1e-3 and held["rel_error_stage1"]["v"] < 1e-3  # 0.5 of bf16: near-lossless
