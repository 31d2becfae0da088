"""Command line: bad input is refused before any work; the real model generates through the cache."""

from __future__ import annotations

import json

import pytest

from echokv import artifact
from echokv.cli import main


def _err(capsys) -> str:
    return capsys.readouterr().err


def _no_model_load(monkeypatch):
    """Fail loudly if a command tries to load a model before validating its input."""
    from echokv.config import ModelConfig

    def boom(config):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(ModelConfig, "load", boom)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "   "], "the prompt is empty"),
        (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found"),
        (["generate", "--prompt", "hi", "--mode", "compressed"], "--mode compressed needs --artifact"),
        (["generate", "--prompt", "hi", "--mode", "auto", "--artifact", "x"], "--mode auto needs --switch-at"),
        (["generate", "--prompt", "hi", "--mode", "compressed", "--artifact", "/nonexistent"], "artifact folder not found"),
    ],
)
def test_generate_bad_input(monkeypatch, capsys, argv, message):
    _no_model_load(monkeypatch)
    assert main(argv) == 2
    assert message in _err(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "hi", "--switch-at", "0"], "must be a positive integer"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "must be a positive integer"),
        (["train", "--compression-ratio", "1", "--out", "x"], "compression ratio must be in [0, 1)"),
        (["train", "--compression-ratio", "-0.2", "--out", "x"], "compression ratio must be in [0, 1)"),
        (["train", "--group-size", "0", "--out", "x"], "must be a positive integer"),
    ],
)
def test_argument_ranges(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in _err(capsys)


def test_train_refuses_an_existing_output_folder(monkeypatch, capsys, tmp_path):
    _no_model_load(monkeypatch)
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert "already exists; pass --overwrite" in _err(capsys)


def test_incomplete_artifact_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    _no_model_load(monkeypatch)
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--prompt", "hi", "--mode", "compressed", "--artifact", str(tmp_path)]) == 2
    assert "reconstructor.safetensors is missing" in _err(capsys)


@pytest.mark.real_model
def test_real_model_generate_json_in_compressed_mode(capsys, smollm2_artifact):
    rc = main([
        "generate", "--artifact", str(smollm2_artifact), "--prompt", "What is the capital of France?",
        "--mode", "auto", "--switch-at", "20", "--max-new-tokens", "12", "--json",
    ])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"text", "mode_at_end", "cache_bytes", "full_cache_bytes", "kept_fraction", "new_tokens"} <= set(out)
    assert out["mode_at_end"] == "compressed" and 0 < out["new_tokens"] <= 12
    assert out["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert out["cache_bytes"] < out["full_cache_bytes"]


@pytest.mark.real_model
def test_real_model_prompt_longer_than_context(capsys, tmp_path, smollm2_artifact):
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)
    rc = main(["generate", "--artifact", str(smollm2_artifact), "--prompt-file", str(long), "--mode", "compressed"])
    assert rc == 2
    assert "exceeds the model's context of 8192 tokens" in _err(capsys)


@pytest.mark.real_model
def test_real_model_artifact_for_another_model(capsys, tmp_path, smollm2_artifact):
    import shutil

    fake = tmp_path / "other"
    shutil.copytree(smollm2_artifact, fake)
    cfg = json.loads((fake / "config.json").read_text())
    for key in ("kv_fingerprint", "kv_fingerprint_fp16"):
        cfg["model"][key] = "0" * 64
    artifact.rewrite_config(fake, cfg)  # an edit on purpose: a new checksum (any other edit is refused as corrupt)
    rc = main(["generate", "--artifact", str(fake), "--prompt", "hi", "--mode", "compressed"])
    assert rc == 2
    assert "trained on a different model" in _err(capsys)
