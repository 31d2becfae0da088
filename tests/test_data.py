"""echokv.data: the bundled text source, user text files, token blocks and their errors."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from echokv import data
from echokv.data import (
    DEFAULT_SOURCE,
    SPLITS,
    TextTooShortError,
    available_tokens,
    load_text,
    require_tokens,
    text_source_info,
    token_blocks,
)

# --------------------------------------------------------------------------------------------------------
# The bundled source
# --------------------------------------------------------------------------------------------------------


def test_source_info_names_origin_licence_and_sizes():
    info = text_source_info()
    assert info["name"] == DEFAULT_SOURCE
    assert "Public domain" in info["licence"] and "PSF" in info["licence"]
    assert info["origin"]
    for split in SPLITS:
        assert info["n_chars"][split] == len(load_text(split))
    assert info["n_chars"]["calibration"] + info["n_chars"]["evaluation"] >= 1_300_000
    for doc in info["documents"]:
        assert doc["licence"] and doc["origin"] and doc["title"] and doc["split"] in SPLITS


def test_manifest_files_are_packaged_and_small():
    manifest = json.loads((data._DATA_DIR / "SOURCES.json").read_text(encoding="utf-8"))
    files = [d["file"] for d in manifest["documents"]]
    assert set(files) == set(manifest["splits"]["calibration"]) | set(manifest["splits"]["evaluation"])
    assert not set(manifest["splits"]["calibration"]) & set(manifest["splits"]["evaluation"])
    total = sum((data._DATA_DIR / f).stat().st_size for f in files)
    assert total < 3_000_000
    for name in manifest["licence_files"]:
        assert (data._DATA_DIR / name).is_file()
    # Every file matches the sha256 in SOURCES.json (checked when loaded).
    for f in files:
        assert data._default_document(f)


def test_default_text_is_real_prose_without_gutenberg_boilerplate():
    calibration = load_text("calibration")
    evaluation = load_text("evaluation")
    assert calibration.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "Down the Rabbit-Hole" in calibration
    assert "Of Man's first disobedience" in calibration
    assert evaluation.startswith("BOTCHAN (MASTER DARLING)")
    for text in (calibration, evaluation):
        assert "gutenberg" not in text.lower()
        assert "\r" not in text


def test_default_source_has_enough_tokens(smollm2_tokenizer):
    n_cal = available_tokens(smollm2_tokenizer, "calibration")
    n_eval = available_tokens(smollm2_tokenizer, "evaluation")
    assert n_cal + n_eval >= 300_000
    assert n_eval >= 60_000
    assert n_cal >= 240_000


def test_splits_share_no_passage():
    calibration = load_text("calibration")
    evaluation = load_text("evaluation")
    rng = random.Random(0)
    for source, other in ((evaluation, calibration), (calibration, evaluation)):
        checked = 0
        for _ in range(2000):
            start = rng.randrange(0, len(source) - 200)
            window = source[start : start + 200]
            if len(window.split()) < 20:  # skip blank-heavy stretches that could match by chance
                continue
            assert window not in other, f"shared passage: {window!r}"
            checked += 1
            if checked >= 300:
                break
        assert checked >= 300


def test_load_text_is_deterministic():
    for split in SPLITS:
        first = load_text(split)
        data._default_text.cache_clear()
        data._default_document.cache_clear()
        assert load_text(split) == first
    assert load_text() == load_text("calibration")


# --------------------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------------------


def test_token_blocks_shape_and_content(smollm2_tokenizer):
    blocks = token_blocks(smollm2_tokenizer, "calibration", n_tokens=1000, seq_len=256)
    assert blocks.shape == (4, 256)
    assert blocks.dtype == torch.long
    expected = smollm2_tokenizer(load_text("calibration")[:20_000], add_special_tokens=False)["input_ids"]
    assert blocks.flatten()[:1000].tolist() == expected[:1000]
    assert smollm2_tokenizer.decode(blocks[0][:8].tolist()).startswith("ALICE")
    assert token_blocks(smollm2_tokenizer, "evaluation", n_tokens=512, seq_len=512).shape == (1, 512)
    assert token_blocks(smollm2_tokenizer, "evaluation", n_tokens=513, seq_len=512).shape == (2, 512)


def test_token_blocks_deterministic_and_not_aliasing_the_cache(smollm2_tokenizer):
    first = token_blocks(smollm2_tokenizer, "evaluation", n_tokens=2048, seq_len=128)
    first_copy = first.clone()
    first.zero_()  # must not corrupt the cache
    second = token_blocks(smollm2_tokenizer, "evaluation", n_tokens=2048, seq_len=128)
    assert torch.equal(second, first_copy)
    data._TOKEN_CACHE.clear()
    third = token_blocks(smollm2_tokenizer, "evaluation", n_tokens=2048, seq_len=128)
    assert torch.equal(third, first_copy)
    calibration = token_blocks(smollm2_tokenizer, "calibration", n_tokens=2048, seq_len=128)
    assert not torch.equal(calibration, first_copy)


def test_available_tokens_is_cached_and_cheap(smollm2_tokenizer):
    available_tokens(smollm2_tokenizer, "calibration")
    start = time.perf_counter()
    n = available_tokens(smollm2_tokenizer, "calibration")
    assert time.perf_counter() - start < 0.1
    assert n == require_tokens(smollm2_tokenizer, "calibration", n_tokens=n, seq_len=1)


def test_too_short_error_says_available_and_asked(smollm2_tokenizer):
    n = available_tokens(smollm2_tokenizer, "evaluation")
    asked = (n // 1000 + 1) * 1000
    with pytest.raises(TextTooShortError) as info:
        token_blocks(smollm2_tokenizer, "evaluation", n_tokens=asked, seq_len=1000)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.available == n and err.requested == asked
    message = str(err)
    assert str(n) in message and str(asked) in message
    assert "evaluation" in message and "paths=" in message
    # require_tokens raises the same error without building blocks.
    with pytest.raises(TextTooShortError, match=str(n)):
        require_tokens(smollm2_tokenizer, "evaluation", n_tokens=asked, seq_len=1000)
    # The largest request that fits works.
    assert (
        token_blocks(smollm2_tokenizer, "evaluation", n_tokens=n // 1000 * 1000, seq_len=1000).shape[0]
        == n // 1000
    )


@pytest.mark.parametrize("n_tokens, seq_len", [(0, 16), (16, 0), (-5, 16), (16, 2.5), (True, 16)])
def test_token_blocks_rejects_bad_sizes(smollm2_tokenizer, n_tokens, seq_len):
    with pytest.raises(ValueError, match="positive integer"):
        token_blocks(smollm2_tokenizer, "calibration", n_tokens=n_tokens, seq_len=seq_len)


# --------------------------------------------------------------------------------------------------------
# User text
# --------------------------------------------------------------------------------------------------------


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _paragraphs(tag, n):
    return (
        "\n".join(f"{tag} paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(n))
        + "\n"
    )


def test_user_file_is_split_in_halves(tmp_path):
    text = _paragraphs("alpha", 200)
    path = _write(tmp_path / "a.txt", text)
    calibration = load_text("calibration", paths=path)
    evaluation = load_text("evaluation", paths=str(path))
    assert calibration + evaluation == text
    assert calibration.endswith("\n")  # cut at a line break
    assert abs(len(calibration) - len(text) / 2) <= 100
    assert calibration.startswith("alpha paragraph 0:")
    info = text_source_info(paths=path)
    assert info["licence"] == "user-supplied"
    assert info["n_chars"] == {"calibration": len(calibration), "evaluation": len(evaluation)}


def test_user_folder_and_list_are_read_in_order(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    _write(folder / "b.txt", _paragraphs("second", 100))
    _write(folder / "a.txt", _paragraphs("first", 100))
    _write(folder / "ignored.md", "not text")
    from_folder = load_text("calibration", paths=folder) + load_text("evaluation", paths=folder)
    assert from_folder == _paragraphs("first", 100) + "\n\n" + _paragraphs("second", 100)
    assert "not text" not in from_folder
    assert load_text("calibration", paths=folder).startswith("first")
    assert (
        load_text("evaluation", paths=folder)
        .rstrip()
        .endswith("second paragraph 99: the quick brown fox jumps over the lazy dog.")
    )
    listed = [folder / "b.txt", folder / "a.txt"]
    assert load_text("calibration", paths=listed).startswith("second")


def test_user_text_token_blocks(tmp_path, smollm2_tokenizer):
    path = _write(tmp_path / "a.txt", _paragraphs("alpha", 400))
    n = available_tokens(smollm2_tokenizer, "calibration", paths=path)
    assert 3000 < n < 10_000
    blocks = token_blocks(smollm2_tokenizer, "calibration", n_tokens=600, seq_len=200, paths=path)
    assert blocks.shape == (3, 200)
    assert smollm2_tokenizer.decode(blocks[0].tolist()).startswith("alpha paragraph 0:")
    with pytest.raises(TextTooShortError, match=str(n)):
        token_blocks(smollm2_tokenizer, "calibration", n_tokens=n + 1, seq_len=1, paths=path)
    # Editing the file is noticed (the token cache is keyed on size and modification time).
    _write(path, _paragraphs("alpha", 100))
    assert available_tokens(smollm2_tokenizer, "calibration", paths=path) < n


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


def test_unknown_split(smollm2_tokenizer):
    with pytest.raises(ValueError, match="unknown split 'train'.*calibration.*evaluation"):
        load_text("train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        token_blocks(smollm2_tokenizer, "test", n_tokens=10, seq_len=10)
    with pytest.raises(ValueError, match="unknown split"):
        available_tokens(smollm2_tokenizer, "validation")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="not found.*nope.txt.*paths="):
        load_text("calibration", paths=missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text("evaluation", paths=[_write(tmp_path / "ok.txt", "some text\n" * 10), missing])


def test_empty_file(tmp_path):
    empty = _write(tmp_path / "empty.txt", "  \n\n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_text("calibration", paths=empty)


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_text("calibration", paths=tmp_path)


def test_other_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="empty list"):
        load_text("calibration", paths=[])
    with pytest.raises(TypeError, match="paths must be"):
        load_text("calibration", paths=42)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_text("calibration", paths=binary)
    with pytest.raises(ValueError, match="too short to split"):
        load_text("calibration", paths=_write(tmp_path / "one.txt", "x"))
