"""Command line: bad input is refused before any work; the real model generates through the cache."""

from __future__ import annotations

import json
import os

import pytest

from echokv import artifact
from echokv.cli import main


def _err(capsys) -> str:
    return capsys.readouterr().err


def _no_model_load(monkeypatch):
    """Fail loudly if a command tries to load a model before validating its input."""

    def boom(config):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("echokv.models.load_configured", boom)


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
    assert "network.safetensors is missing" in _err(capsys)


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


# -- issue #16: one clear line for a user's mistake, exit code 2, the traceback only with --debug -------------


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """An artifact for the CLI's ``tiny-llama`` (a random model with a byte tokenizer; trained in a second)."""
    from echokv.models import load_model
    from helpers import train_tiny

    model, _ = load_model("tiny-llama")
    recon, report = train_tiny(model, steps=0)
    return artifact.save(recon, model, tmp_path_factory.mktemp("cli") / "tiny", report)


def test_switch_at_alone_runs_in_auto_mode(capsys, tiny_artifact):
    # issue #16: `generate --artifact A --switch-at 5` ran in full mode (--mode defaulted to full)
    rc = main(["generate", "--model", "tiny-llama", "--artifact", str(tiny_artifact), "--prompt", "hello there",
               "--switch-at", "5", "--max-new-tokens", "3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode_at_end"] == "compressed" and out["switched_at"] >= 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "full", "--switch-at", "5"], "--switch-at set(s) when auto mode switches, but --mode full never"),
        (["--mode", "compressed", "--memory-budget", "1000"], "--memory-budget set(s) when auto mode switches"),
        (["--switch-at", "5"], "--mode auto needs --artifact"),
    ],
)
def test_switch_settings_that_would_be_ignored(monkeypatch, capsys, extra, message):
    _no_model_load(monkeypatch)
    assert main(["generate", "--prompt", "hi", *extra]) == 2
    assert message in _err(capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "compressed"], "--mode compressed needs --artifact DIR (train one with `echokv train`) or --echokv-q"),
        (["--echokv-q", "0"], "--echokv-q 0 removes nothing"),
        (["--echokv-q", "0.5", "--artifact", "A"], "which switch on memory: pass --memory-budget BYTES"),
        (["--echokv-q", "0.5", "--artifact", "A", "--switch-at", "9"], "--memory-budget BYTES instead of --switch-at"),
    ],
)
def test_fast_codec_flags_refused_before_the_model_loads(monkeypatch, capsys, extra, message):
    _no_model_load(monkeypatch)
    assert main(["generate", "--prompt", "hi", *extra]) == 2
    assert message in _err(capsys)


def test_generate_with_the_fast_codec_and_with_tiers(capsys, tmp_path, tiny_artifact):
    """--echokv-q alone compresses from the start; with an artifact and a budget, the ladder full -> EchoKV-Q ->
    the mix, each step when the budget is passed (tiny-llama: its byte tokenizer makes ~200 tokens of this)."""
    prompt = tmp_path / "p.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog; " * 5)
    base = ["generate", "--model", "tiny-llama", "--prompt-file", str(prompt), "--max-new-tokens", "3", "--json"]
    assert main([*base, "--echokv-q", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode_at_end"] == "compressed" and out["switched_at"] == 0 and out["kept_fraction"] < 0.8
    # the artifact was trained in float32 (a ratio is of the bytes of the dtype it was trained in)
    assert main([*base, "--echokv-q", "0.5", "--artifact", str(tiny_artifact), "--memory-budget", "2000",
                 "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [name for name, _ in out["tier_changes"]] == ["echokv-q@0.5", "echokv"]
    assert out["tier_at_end"] == "echokv" and out["cache_bytes"] < out["full_cache_bytes"]


def test_prompt_files_that_are_not_text_files(monkeypatch, capsys, tmp_path):
    # issue #16: a folder as --prompt-file was "not found"; a non-UTF-8 file did not name the file
    _no_model_load(monkeypatch)
    assert main(["generate", "--prompt-file", str(tmp_path)]) == 2
    assert f"--prompt-file {tmp_path} is a folder" in _err(capsys)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["generate", "--prompt-file", str(latin)]) == 2
    assert f"prompt file {latin} is not UTF-8 text (byte 0xe9 at position 3)" in _err(capsys)


def test_artifact_problems_before_the_model_loads(monkeypatch, capsys, tmp_path, tiny_artifact):
    import shutil

    _no_model_load(monkeypatch)
    base = ["generate", "--prompt", "hi", "--mode", "compressed", "--artifact"]
    assert main([*base, str(tiny_artifact / "config.json")]) == 2  # issue #16: a file was "not found"
    assert "is a file, not an artifact folder" in _err(capsys)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    (bad / "config.json").write_text("[1, 2, 3]")
    assert main([*base, str(bad)]) == 2
    err = _err(capsys)
    assert f"{bad / 'config.json'}: holds a JSON list" in err and "Traceback" not in err
    (bad / "config.json").write_bytes((tiny_artifact / "config.json").read_bytes())
    (bad / "network.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle
    assert main([*base, str(bad)]) == 2
    assert f"{bad / 'network.safetensors'}: " in _err(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "--model", ""], "the model name is empty"),
        (["info", "--model", "tiny-llama", "--device", "cuda"], "device 'cuda' cannot be used"),
        (["info", "--model", "tiny-llama", "--device", "gpu"], "unknown device 'gpu'"),
    ],
)
def test_model_problems_are_one_line(monkeypatch, capsys, argv, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("echokv: error: ")


def test_debug_shows_the_traceback(monkeypatch, capsys):
    _no_model_load(monkeypatch)
    argv = ["generate", "--prompt", "hi", "--mode", "compressed", "--artifact", "/nonexistent"]
    assert main(argv) == 2
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(artifact.ArtifactError, match="artifact folder not found"):
            main(debug)


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (PermissionError(13, "Permission denied", "/x/out"), 2, "/x/out: Permission denied"),
        (FileNotFoundError("no such thing"), 2, "no such thing"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "a file is not UTF-8 text"),
        (OSError(28, "No space left on device"), 1, "No space left on device"),
    ],
)
def test_error_classes_map_to_one_line(monkeypatch, capsys, exc, code, line):
    from echokv.cli import info

    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)
    assert main(["info"]) == code
    err = _err(capsys)
    assert err.startswith(f"echokv: error: {line}") and len(err.strip().splitlines()) == 1


def test_ctrl_c_is_one_line_saying_what_was_kept(monkeypatch, capsys, tmp_path):
    # issue #29: Ctrl-C printed a 30-line KeyboardInterrupt traceback
    from echokv.cli import train
    from echokv_lab.cli import eval as eval_cmd

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", stopped)
    assert main(["train", "--out", str(tmp_path / "art")]) == 130
    assert _err(capsys).strip() == "echokv: interrupted; nothing written"
    out = tmp_path / "eval"
    out.mkdir()
    (out / "old.txt").write_text("from before this run")
    os.utime(out / "old.txt", (0, 0))

    def some_rows(args):
        (out / "results.json").write_text("[]")
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cmd, "run", some_rows)
    assert main(["eval", "--out", str(out), "--resume"]) == 130
    err = _err(capsys).strip()
    assert "\n" not in err and f"kept what was finished in {out}: results.json" in err and "--resume" in err
    monkeypatch.setattr(train, "run", stopped)
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback
        main(["--debug", "train", "--out", str(tmp_path / "art")])
