"""Small helpers of the library and its commands: output folders written atomically, comma-separated lists."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

_KINDS = {int: "an integer", float: "a number"}


def parse_csv(text, type=str, what: str = "value", example: str | None = None) -> list | None:
    """``"a,b,c"`` (or a list, or one number) -> its items converted by ``type`` (None stays None).

    An item ``type`` refuses raises ``ValueError`` naming ``what`` (and, with ``example``, how to write it).
    """
    if text is None:
        return None
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
    elif isinstance(text, (int, float)):
        items = [text]
    else:
        items = [t.strip() if isinstance(t, str) else t for t in text]
    out = []
    for item in items:
        try:
            out.append(type(item))
        except (TypeError, ValueError):
            hint = f" (pass e.g. {example})" if example else ""
            raise ValueError(f"{what} {item!r} is not {_KINDS.get(type, type.__name__)}{hint}") from None
    return out


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless ``overwrite``) or a path that is not a folder."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder")


def _sibling(out: Path, tag: str) -> Path:
    """An unused hidden path next to ``out`` (same filesystem, so the final rename is atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False, replace: bool = True):
    """Write the output folder ``out`` so that an interrupted run never leaves one that looks complete.

    Yields a new hidden folder next to ``out`` to write into. When the block ends without an error:
    ``replace=True``: that folder becomes ``out`` (an old ``out`` is removed once the new one is in place);
    ``replace=False``: its files are moved into ``out`` one by one (other files of ``out`` stay). On an error
    it is removed. ``out`` must not exist unless ``overwrite`` (checked before and after the block).
    """
    out = Path(out).expanduser()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "partial")
    tmp.mkdir()  # plain mkdir, not mkdtemp: the result gets the user's usual permissions, not 0700
    try:
        yield tmp
        check_output_dir(out, overwrite)  # someone may have created it meanwhile
        if not replace:
            out.mkdir(exist_ok=True)
            for path in tmp.iterdir():
                os.replace(path, out / path.name)
            tmp.rmdir()
        elif out.exists():
            old = _sibling(out, "old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
