"""Small helpers of the library and its commands: output folders that never lose a user's file and never look
complete before they are, comma-separated lists.

**Output folders.** Every command that writes a folder (an artifact, ``analyze``, ``eval``, ``bench``) checks
it with :func:`check_output_dir` before any work and writes it with :func:`atomic_dir`. The rules:

* echokv never writes its output to the current folder, a parent of it, the home folder or the root
  (``--out .`` would otherwise replace the user's working folder);
* an existing folder is replaced only with ``overwrite`` and only when everything in it is recognisably
  echokv's own output (:func:`foreign_entries`: an artifact, a report, figures, and nothing else); otherwise
  the error names the files that are not echokv's;
* the output is written into a hidden sibling folder and put in place by one rename, so an interrupted run
  (even ``kill -9``) never leaves a folder at ``out`` that looks complete; the hidden leftovers of a killed
  run are recognisable by name, refused as artifacts, and cleaned up by the next write to the same ``out``;
* writability is probed (a folder created and removed) before any work, so a read-only ``--out`` fails in
  a second, not after training.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("echokv")

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


# -- what echokv writes, recognisably ----------------------------------------------------------------------


class OutputFolderError(FileExistsError):
    """An output path echokv will not write or replace: the current, a parent, the home or the root folder,
    a folder holding files echokv did not write, a file, or an existing folder without ``overwrite``."""


def _head(path: Path, n: int) -> bytes | None:
    """The first ``n`` bytes of a file, None where it cannot be read."""
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError:
        return None


def _names_format(prefix: str, within: int) -> Callable[[Path], bool]:
    """A file whose first ``within`` bytes name the format ``prefix`` (an artifact's ``config.json``, whose first
    key it is; a weights file, whose header metadata holds it). Read as bytes, so that a truncated or corrupt
    file of echokv's is still recognised as its own (and may be replaced by a new one)."""
    needle, compact = f'"format": "{prefix}'.encode(), f'"format":"{prefix}'.encode()

    def check(path: Path) -> bool:
        head = _head(path, within) or b""
        return needle in head or compact in head

    return check


def _starts_with(prefix: bytes) -> Callable[[Path], bool]:
    return lambda path: _head(path, len(prefix)) == prefix


def _json_file(path: Path) -> bool:
    return _starts_with(b"{")(path) or _starts_with(b"[")(path)


def _matplotlib_png(path: Path) -> bool:
    """A PNG drawn by matplotlib (its ``Software`` text chunk), as every figure of echokv is."""
    head = _head(path, 4096) or b""
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head


_ARTIFACT_FORMAT = "echokv-artifact/"

#: the files echokv writes into an output folder, by name, and how each is recognised as echokv's own:
#: an artifact (:mod:`echokv.artifact`), ``analyze``, ``eval``, ``bench`` and ``demo``. A writer of a new file
#: adds it here; anything else in a folder makes it foreign (never replaced).
OWN_FILES: dict[str, Callable[[Path], bool]] = {
    "config.json": _names_format(_ARTIFACT_FORMAT, 4096),
    "network.safetensors": _names_format(_ARTIFACT_FORMAT, 1 << 20),
    "network_stage1.safetensors": _names_format(_ARTIFACT_FORMAT, 1 << 20),
    "reconstructor.safetensors": _names_format(_ARTIFACT_FORMAT, 1 << 20),  # older artifacts' names
    "reconstructor_stage1.safetensors": _names_format(_ARTIFACT_FORMAT, 1 << 20),
    "train_report.json": _json_file,
    "similarity.json": _json_file,
    "artifact_analysis.json": _json_file,
    "artifact_analysis.md": _starts_with(b"# EchoKV"),
    "results.json": _json_file,
    "job.json": _json_file,
    "predictions.jsonl": _starts_with(b""),
    "report.md": _starts_with(b"# EchoKV"),
    "bench.json": _json_file,
    "demo.json": _json_file,
}
#: file name patterns (suffix) echokv writes under many names: figures
OWN_SUFFIXES: dict[str, Callable[[Path], bool]] = {".png": _matplotlib_png}

#: hidden folders of :func:`atomic_dir` next to ``out``: ``.<name>.<tag>-<pid>-<8 hex>``
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<tag>partial|old|probe)-(?P<pid>\d+)-[0-9a-f]{8}$")


def is_unfinished_output(path) -> bool:
    """Whether ``path`` is one of :func:`atomic_dir`'s hidden working folders (a write in progress, or one
    that a killed run left behind): never a finished output."""
    return _HIDDEN.match(Path(path).name) is not None


def foreign_entries(folder, depth: int = 2) -> list[str]:
    """Entries of ``folder`` that echokv did not write, recognisably (relative paths, sorted).

    echokv's own: the files of :data:`OWN_FILES` (each recognised by name *and* content: an artifact's
    ``config.json`` names its format, a weights file's header does, a figure was drawn by matplotlib, ...),
    :data:`OWN_SUFFIXES`, the hidden working folders of :func:`atomic_dir`, and sub-folders made only of
    these (e.g. the artifact ``echokv demo`` keeps in its folder). Everything else is foreign: an empty
    sub-folder, a symbolic link, a user's file.
    """
    folder = Path(folder)
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_dir():
            if _HIDDEN.match(name):
                continue
            inner = foreign_entries(entry, depth - 1) if depth > 0 and any(entry.iterdir()) else ["*"]
            foreign += [f"{name}/" if x == "*" else f"{name}/{x}" for x in inner]
        elif not is_own_file(entry):
            foreign.append(name)
    return foreign


def is_own_file(path) -> bool:
    """Whether the file ``path`` is one echokv writes (:data:`OWN_FILES`, :data:`OWN_SUFFIXES`), by name and
    content: what a writer may delete or replace."""
    path = Path(path)
    check = OWN_FILES.get(path.name) or OWN_SUFFIXES.get(path.suffix.lower())
    return check is not None and path.is_file() and check(path)


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be an output folder (None if it may)."""
    try:
        target = out.resolve()
        cwd = Path.cwd().resolve()
    except OSError:
        return None
    if target == cwd:
        return "the current folder"
    if cwd.is_relative_to(target):
        return "the root folder" if target == Path(target.anchor) else "a parent of the current folder"
    if target == Path(target.anchor):
        return "the root folder"
    with contextlib.suppress(RuntimeError, KeyError, OSError):
        if target == Path.home().resolve():
            return "your home folder"
    return None


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(out, overwrite: bool, replace: bool = True, tidy: bool = True, files: tuple[str, ...] = (),
                     flag: str | None = "--overwrite") -> None:
    """Refuse, before any work, an output folder that could not or must not be written.

    ``replace=True`` (an artifact, ``analyze``): the folder is written whole. Refused: the current folder, a
    parent of it, the home or root folder (always); a path that is a file or a symbolic link; an existing
    folder holding anything echokv did not write (always, naming it); an existing folder of echokv's
    without ``overwrite``. ``replace=False`` (files written into a folder, other files staying, as ``bench``
    does): only a path that is not a folder is refused, and, of the ``files`` it writes, one that exists without
    ``overwrite`` (the user's own file of that name always). Both probe that the folder can be written
    (:func:`check_writable`). Raises :class:`OutputFolderError` (a ``FileExistsError``) or ``PermissionError``.
    ``flag``: the option that allows replacing, as the caller spells it (None: it has none).
    With ``tidy``, what a killed run left next to ``out`` is tidied first (:func:`clean_stale`), so the check
    sees what the write will find.
    """
    out = Path(out).expanduser()
    if tidy:
        clean_stale(out)
    why = _protected(out) if replace else None
    if why is not None:
        raise OutputFolderError(f"refusing to use {out} ({why}) as an output folder: echokv replaces its "
                                f"output folder as a whole; pass a new folder, e.g. {out / 'echokv-out'}")
    if out.is_symlink() and replace:
        raise OutputFolderError(f"output path {out} is a symbolic link; echokv does not replace links, pass the "
                                "folder itself or a new one")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output path {out} exists and is not a folder")
    if replace and out.exists():
        foreign = foreign_entries(out)
        if foreign:
            raise OutputFolderError(
                f"output folder {out} holds files echokv did not write ({_listing(foreign)}); echokv never "
                "deletes them: pass a new folder, or move them away first"
            )
        if not overwrite:
            raise OutputFolderError(f"output folder {out} already exists; "
                                    + (f"pass {flag} to replace it" if flag else "pass a new folder"))
    there = [name for name in files if (out / name).exists() or (out / name).is_symlink()]
    if there and not replace:
        foreign = [name for name in there if not is_own_file(out / name)]
        if foreign:
            raise OutputFolderError(f"{out} holds files of the same names that echokv did not write "
                                    f"({_listing(foreign)}); echokv never replaces them: move them away or pass "
                                    "another output folder")
        if not overwrite:
            raise OutputFolderError(f"{out} already holds {_listing(there)}; "
                                    + (f"pass {flag} to replace" if flag else "pass a new folder, or move")
                                    + (" them" if len(there) > 1 else " it"))
    check_writable(out)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out) -> None:
    """Probe that the folder ``out`` can be created or replaced, and written into: a hidden folder made and
    removed in its parent (or the nearest existing ancestor) and, when ``out`` exists, in ``out``. Raises
    ``PermissionError`` (or ``NotADirectoryError``) naming the folder."""
    out = Path(out).expanduser()
    places = [_nearest_existing(out.parent)]
    if out.is_dir():
        places.append(out)
    for place in places:
        if not place.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"cannot write the output {out}: {place} is a file, not a "
                                     "folder")
        probe = place / f".{out.name or 'out'}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise PermissionError(exc.errno, f"cannot write the output {out}: {place} is not writable "
                                      f"({exc.strerror}); choose another --out") from None
            # anything else the probe met (/proc refuses folders with ENOENT): the user's path, not the probe's
            raise type(exc)(exc.errno, f"cannot write the output {out}: {place} does not take new folders "
                            f"({exc.strerror}); choose another --out") from None


# -- writing a folder atomically ----------------------------------------------------------------------------


def _sibling(out: Path, tag: str) -> Path:
    """An unused hidden path next to ``out`` (same filesystem, so the final rename is atomic)."""
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as exc:  # (PermissionError: alive, another user's)
        return not isinstance(exc, ProcessLookupError)
    return True


def _remove_own(folder: Path) -> list[str]:
    """Remove what echokv wrote in ``folder`` (recognised as in :func:`foreign_entries`), then the folder if
    that emptied it. Returns the entries left (not echokv's)."""
    left = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            left.append(entry.name)
        elif entry.is_dir():
            if _HIDDEN.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                left += [f"{entry.name}/{x}" for x in _remove_own(entry)]
        elif is_own_file(entry) or _HIDDEN.match(entry.name):
            entry.unlink(missing_ok=True)
        else:
            left.append(entry.name)
    if not left:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return left


def clean_stale(out) -> None:
    """Tidy what a killed run (its process gone) left next to ``out``: unfinished ``partial`` folders (and
    ``probe`` folders) are removed; a replaced ``old`` folder is put back when ``out`` is missing (a kill
    between the two renames of a replacement, where the exchange is not atomic), removed otherwise."""
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        m = _HIDDEN.match(entry.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])) or not entry.is_dir() or entry.is_symlink():
            continue
        if m["tag"] == "old" and not out.exists() and not out.is_symlink():
            with contextlib.suppress(OSError):
                entry.rename(out)
                log.warning("restored %s (a replacement of it was interrupted)", out)
                continue
        if m["tag"] == "old":
            _remove_own(entry)  # the previous output, echokv's own (checked before it was replaced)
        else:
            shutil.rmtree(entry, ignore_errors=True)  # made by echokv and written only by it


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    """The process's umask (read without changing it where Linux says it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _user_modes(folder: Path) -> None:
    """Give the files written in ``folder`` the permissions of the user's umask: some writers (safetensors) make
    their files 0600, beside a config.json of 0644."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            with contextlib.suppress(OSError):
                path.chmod(mode)


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False, replace: bool = True, flag: str | None = "--overwrite"):
    """Write the output folder ``out`` so that nothing a user wrote is lost and an interrupted run never leaves
    a folder that looks complete.

    Checks ``out`` first (:func:`check_output_dir`), then yields a new hidden folder next to ``out`` to write
    into. When the block ends without an error: ``replace=True``: that folder becomes ``out`` in one atomic
    exchange (Linux; elsewhere two renames, undone by :func:`clean_stale` if killed in between), and the
    previous ``out``, echokv's own, is removed; ``replace=False``: its files are moved into ``out`` one by one,
    replacing only files of the same name that are echokv's (other files stay). Its files get the modes of the
    user's umask. ``flag``: the caller's option that allows replacing (None: it has none). On an error the hidden folder
    is removed; a run killed outright leaves only the hidden folder, which the next write to ``out`` removes.
    """
    out = Path(out).expanduser()
    check_output_dir(out, overwrite, replace, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "partial")
    tmp.mkdir()  # plain mkdir, not mkdtemp: the result gets the user's usual permissions, not 0700
    old = None
    try:
        yield tmp
        _user_modes(tmp)
        check_output_dir(out, overwrite, replace, tidy=False, flag=flag)  # someone may have changed it meanwhile
        if not replace:
            _move_into(tmp, out)
            return
        if not out.exists():
            tmp.rename(out)
            return
        if _exchange(tmp, out):  # tmp now holds the previous output
            old = tmp
        else:
            old = _sibling(out, "old")
            out.rename(old)
            tmp.rename(out)
    except BaseException:
        if old is not None and old != tmp and old.exists() and not out.exists():
            old.rename(out)  # the second rename failed: the previous output goes back
        if old is not tmp:
            shutil.rmtree(tmp, ignore_errors=True)  # only ever the new, unfinished output
        raise
    left = _remove_own(old)  # the previous output: only what echokv wrote in it
    if left:  # appeared between the check and the exchange: kept, and said where
        log.warning("kept %s (not written by echokv) in %s", _listing(left), old)


def _move_into(tmp: Path, out: Path) -> None:
    out.mkdir(exist_ok=True)
    clash = [p.name for p in tmp.iterdir() if (out / p.name).exists() and not is_own_file(out / p.name)]
    if clash:
        raise OutputFolderError(f"{out} holds files of the same names that echokv did not write "
                                f"({_listing(clash)}); move them away or pass another output folder")
    for path in tmp.iterdir():
        os.replace(path, out / path.name)
    tmp.rmdir()
