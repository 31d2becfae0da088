"""Text for calibration and evaluation: a bundled default source of real English text, or the user's files.

The default source, :data:`DEFAULT_SOURCE`, is vendored in ``echokv/data/`` (about 1.45 MB, ~370k tokens of the
SmolLM2 tokenizer), so it is available offline, after a plain ``pip install echokv``, and byte-for-byte the
same on every machine. ``echokv/data/SOURCES.json`` names the origin and licence of every file:

* **calibration** split: *Alice's Adventures in Wonderland* (Lewis Carroll), the Python Language/Library
  Reference topics (CPython 3.11 ``pydoc_data``, PSF-2.0 licence, see ``LICENSE-PSF.txt``), *As You Like It*
  (Shakespeare) and *Paradise Lost* (Milton), in that order;
* **evaluation** split: *Botchan (Master Darling)* by Natsume Soseki, English translation of 1919.

The literary texts are public domain (the first three come from the Canterbury Corpus copies shipped in the
``brotli`` sdist, *Botchan* from Project Gutenberg EBook #8868 as shipped in the ``sentencepiece`` sdist), with
Project Gutenberg headers and licence boilerplate removed. The two splits share no document.

With ``paths=`` the user's own text replaces the default source, cut into a calibration and an evaluation half
(:func:`load_text`).

:func:`token_blocks` tokenizes a split (no special tokens) and cuts it into consecutive blocks;
:func:`available_tokens` and :func:`require_tokens` tell, cheaply and before any model work, whether a split is
long enough. Token ids are cached in-process per (tokenizer, split, source).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import cache, lru_cache
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_SOURCE",
    "HAYSTACK_SPLITS",
    "SPLITS",
    "TextTooShortError",
    "available_tokens",
    "haystack_sources",
    "load_text",
    "require_tokens",
    "text_source_info",
    "token_blocks",
]

DEFAULT_SOURCE = "echokv-public-text-v1"
SPLITS = ("calibration", "evaluation")
#: splits of the needle-in-a-haystack haystacks: ``dev`` for choosing defaults, ``test`` for reports
HAYSTACK_SPLITS = ("dev", "test")

_DATA_DIR = Path(__file__).resolve().parent / "data"
_SOURCES_FILE = _DATA_DIR / "SOURCES.json"
_USER_JOINER = "\n\n"
_PATHS_HINT = "pass paths= a UTF-8 .txt file, a folder of .txt files, or a list of them"


class TextTooShortError(ValueError):
    """A split holds fewer tokens than were asked for; the message gives both numbers and what to change."""

    def __init__(self, message: str, *, available: int, requested: int):
        super().__init__(message)
        self.available = available
        self.requested = requested


# -- sources ----------------------------------------------------------------------------------------------
def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: pass split='calibration' or split='evaluation'")
    return split


@lru_cache(maxsize=1)
def _manifest() -> dict:
    if not _SOURCES_FILE.is_file():
        raise FileNotFoundError(
            f"the bundled text source is missing ({_SOURCES_FILE}); reinstall echokv, or {_PATHS_HINT}"
        )
    return json.loads(_SOURCES_FILE.read_text(encoding="utf-8"))


@cache
def _default_document(name: str) -> str:
    """One bundled document, checked against the sha256 recorded in SOURCES.json."""
    manifest = _manifest()
    docs = manifest["documents"] + manifest.get("haystacks", {}).get("documents", [])
    meta = next((d for d in docs if d["file"] == name), None)
    if meta is None:
        raise ValueError(f"SOURCES.json lists no document {name!r}")
    path = _DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"the bundled text file {path} is missing; reinstall echokv, or {_PATHS_HINT}")
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != meta["sha256"]:
        raise ValueError(
            f"the bundled text file {path} does not match its sha256 in SOURCES.json (modified or corrupted); "
            f"reinstall echokv, or {_PATHS_HINT}"
        )
    return text


@cache
def _default_text(split: str) -> str:
    manifest = _manifest()
    return manifest["joiner"].join(_default_document(name) for name in manifest["splits"][split])


def _expand_paths(paths) -> list[Path]:
    """The user's text files, in order; a folder contributes its ``*.txt`` files sorted by name."""
    if isinstance(paths, (str, os.PathLike)):
        items = [paths]
    elif isinstance(paths, (list, tuple)):
        items = list(paths)
    else:
        raise TypeError(f"paths must be a str, a Path or a list of them, not {type(paths).__name__}; {_PATHS_HINT}")
    if not items:
        raise ValueError(f"paths is an empty list; {_PATHS_HINT}, or paths=None for the bundled text")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"paths holds a {type(item).__name__} ({item!r}); {_PATHS_HINT}")
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
            if not found:
                raise FileNotFoundError(f"the folder {path} holds no .txt files; {_PATHS_HINT}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text file or folder not found: {path}; {_PATHS_HINT}")
    return files


def _read_user_file(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"the text file {path} is not valid UTF-8 ({err}); convert it to UTF-8") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"the text file {path} is empty; {_PATHS_HINT} holding some text")
    return text


def _user_signature(files: list[Path]) -> tuple:
    """Identifies the user's text for caching: resolved path, size and modification time of every file."""
    return tuple((str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


def _halves(text: str) -> tuple[str, str]:
    """``text`` cut at the first line break at or after its middle character."""
    newline = text.find("\n", len(text) // 2)
    cut = newline + 1 if newline != -1 else len(text) // 2
    return text[:cut], text[cut:]


@lru_cache(maxsize=8)
def _user_splits(signature: tuple) -> tuple[str, str]:
    text = _USER_JOINER.join(_read_user_file(Path(p)) for p, _, _ in signature)
    calibration, evaluation = _halves(text)
    if not calibration.strip() or not evaluation.strip():
        names = ", ".join(p for p, _, _ in signature)
        raise ValueError(f"the text in {names} is too short to split into calibration and evaluation halves "
                         f"({len(text)} characters); pass more text")
    return calibration, evaluation


def load_text(split: str = "calibration", paths: str | os.PathLike | list | tuple | None = None) -> str:
    """The text of one split.

    Args:
        split: ``"calibration"`` or ``"evaluation"``.
        paths: ``None`` for the bundled :data:`DEFAULT_SOURCE`; otherwise a UTF-8 text file, a folder (its
            ``*.txt`` files, sorted by name) or a list of them. The user's text is joined (blank line between
            files) and cut at the first line break at or after its middle character: the first half is the
            calibration split, the second half the evaluation split, so the two never overlap.

    Raises:
        ValueError: unknown split, an empty or non-UTF-8 file, or text too short to split.
        FileNotFoundError: a path that does not exist, or a folder without ``.txt`` files.
    """
    _check_split(split)
    if paths is None:
        return _default_text(split)
    calibration, evaluation = _user_splits(_user_signature(_expand_paths(paths)))
    return calibration if split == "calibration" else evaluation


def text_source_info(paths: str | os.PathLike | list | tuple | None = None) -> dict:
    """Name, origin, licence and size of the text source (the bundled one by default).

    Returns a dict with ``name``, ``origin``, ``licence``, ``n_chars`` (``{split: characters}``) and
    ``documents`` (per document: file, split, title, author, licence, origin, n_chars). With ``paths``, the
    user's files are described instead (licence ``"user-supplied"``).
    """
    if paths is not None:
        files = _expand_paths(paths)
        n_chars = {split: len(load_text(split, paths)) for split in SPLITS}
        return {
            "name": "user-text",
            "origin": ", ".join(str(f) for f in files),
            "licence": "user-supplied",
            "n_chars": n_chars,
            "documents": [{"file": str(f)} for f in files],
        }
    manifest = _manifest()
    return {
        "name": DEFAULT_SOURCE,
        "description": manifest["description"],
        "origin": manifest["origin"],
        "licence": manifest["licence"],
        "n_chars": {split: len(_default_text(split)) for split in SPLITS},
        "documents": [
            {k: d[k] for k in ("file", "split", "title", "author", "kind", "licence", "origin", "n_chars")}
            for d in manifest["documents"]
        ],
        "data_dir": str(_DATA_DIR),
    }


def haystack_sources(split: str = "test", paths=None) -> list[dict]:
    """The haystack texts of the needle-in-a-haystack tasks for a split, each ``{"name", "kind", "text"}``.

    The bundled ones (``SOURCES.json``'s ``haystacks``): ``test`` (the reports' split) holds *Botchan* (prose), a
    part of the Library of Congress *Workshop on Electronic Texts* proceedings (technical prose) and Brotli's
    command-line tool (C code); ``dev`` (for choosing defaults) another part of those proceedings and Brotli's
    Python bindings (C code). No haystack is in the calibration split. With ``paths`` the user's text is one more
    source (named ``user``): the evaluation half of it (:func:`load_text`), whose second half serves ``test`` and
    first half ``dev``, so no haystack shares text with any calibration split.
    """
    if split not in HAYSTACK_SPLITS:
        raise ValueError(f"unknown haystack split {split!r}; choose one of {', '.join(HAYSTACK_SPLITS)}")
    section = _manifest()["haystacks"]
    docs = {d["file"]: d for d in section["documents"]}
    out = [{"name": Path(name).name.split(".")[0], "kind": docs[name]["kind"], "text": _default_document(name)}
           for name in section["splits"][split]]
    if paths is not None:  # the evaluation half of the user's text (never its calibration half), cut in two
        text = load_text("evaluation", paths)
        dev, test = _halves(text)
        part = test if split == "test" else dev
        out.append({"name": "user", "kind": "user text", "text": part if part.strip() else text})
    return out


# -- tokens -----------------------------------------------------------------------------------------------
_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_TOKEN_CACHE_MAX = 16


def _tokenizer_key(tokenizer) -> tuple | None:
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return None  # no stable identity: do not cache
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    return (str(name), type(tokenizer).__qualname__, size)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (and without the over-long-sequence warning)."""
    try:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if ids and isinstance(ids[0], list):  # a batched answer for one text
        ids = ids[0]
    return list(ids)


def _token_ids(tokenizer, split: str, paths) -> torch.Tensor:
    """All token ids of a split as a 1-D int64 tensor (cached; do not modify it in place)."""
    _check_split(split)
    source = ("default", DEFAULT_SOURCE) if paths is None else ("user", _user_signature(_expand_paths(paths)))
    tok_key = _tokenizer_key(tokenizer)
    key = None if tok_key is None else (tok_key, split, source)
    if key is not None and key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    ids = torch.tensor(_encode(tokenizer, load_text(split, paths)), dtype=torch.long)
    if key is not None:
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_MAX:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = ids
    return ids


def available_tokens(tokenizer, split: str, paths: str | os.PathLike | list | tuple | None = None) -> int:
    """How many tokens (no special tokens) the split holds for this tokenizer."""
    return int(_token_ids(tokenizer, split, paths).numel())


def _check_sizes(n_tokens: int, seq_len: int) -> tuple[int, int]:
    for name, value in (("n_tokens", n_tokens), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n_blocks = math.ceil(n_tokens / seq_len)
    return n_blocks, n_blocks * seq_len


def require_tokens(
    tokenizer, split: str, n_tokens: int, seq_len: int, paths: str | os.PathLike | list | tuple | None = None
) -> int:
    """Check, before any heavy work, that :func:`token_blocks` can serve this request.

    Returns the number of tokens it will use (``ceil(n_tokens / seq_len) * seq_len``).

    Raises:
        TextTooShortError: the split holds fewer tokens than that; the message gives both numbers.
    """
    n_blocks, needed = _check_sizes(n_tokens, seq_len)
    available = available_tokens(tokenizer, split, paths)
    if available < needed:
        source = DEFAULT_SOURCE if paths is None else "the text in paths"
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        max_blocks = available // seq_len
        raise TextTooShortError(
            f"the {split} split of {source} has {available} tokens ({name} tokenizer), but {needed} tokens were "
            f"asked ({n_blocks} blocks of seq_len={seq_len} for n_tokens={n_tokens}); ask for at most "
            f"{max_blocks * seq_len} tokens ({max_blocks} blocks) or pass longer text with paths=",
            available=available,
            requested=needed,
        )
    return needed


def token_blocks(
    tokenizer,
    split: str,
    n_tokens: int,
    seq_len: int,
    paths: str | os.PathLike | list | tuple | None = None,
) -> torch.LongTensor:
    """Consecutive blocks of ``seq_len`` tokens from the start of a split.

    The split's text (see :func:`load_text`) is tokenized once, without special tokens, and its first
    ``ceil(n_tokens / seq_len) * seq_len`` ids are returned as a ``[ceil(n_tokens / seq_len), seq_len]`` int64
    tensor (a fresh copy; deterministic for a given tokenizer).

    Raises:
        ValueError: unknown split or non-positive sizes.
        TextTooShortError: the split is too short for the request (see :func:`require_tokens`).
    """
    needed = require_tokens(tokenizer, split, n_tokens, seq_len, paths)
    ids = _token_ids(tokenizer, split, paths)
    return ids[:needed].clone().view(-1, seq_len)
