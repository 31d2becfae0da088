"""The ``echokv`` command line: info, train, generate, demo (one module each), and the commands other packages
register through the ``echokv.commands`` entry point (the harness's analyze, eval, bench: :mod:`echokv_lab.cli`).

Each command module has ``HELP``, ``CONFIGS`` (the dataclasses of :mod:`echokv.config` its flags are
made from) and ``run(args)``: cheap checks (ranges, files, folders) before the model is loaded, checks
that need the model (geometry, artifact fingerprint, context length) right after loading, then the
library call, then printing.
Library messages (``logging.getLogger("echokv")``) are shown on stderr.

A user's mistake (any of :data:`USER_ERRORS`: the library's own error classes, a bad value, a file that is
missing, exists, cannot be written or is not UTF-8) is one line on stderr, ``echokv: error: ...``, and exit
code 2; ``--debug`` shows the traceback instead. Another ``OSError`` (a full disk, ...) is one line and exit
code 1. Ctrl-C is one line too (exit code 130): what the run kept, or "interrupted; nothing written". An output
folder that is, or holds, one of the command's inputs is refused before any work. Anything else is a bug of
echokv and keeps its traceback.

Under ``torchrun`` (:mod:`echokv.distributed`) ``train`` and ``eval`` run data-parallel: each process joins the
group, only rank 0 prints and writes, and an error line names the rank it came from. A rank that exits with an
error makes torchrun stop the others.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
from pathlib import Path

from .. import distributed
from . import demo, generate, info, train
from ._args import UsageError, add_options, check_outputs_are_not_inputs

#: what a user's mistake raises: one line and exit code 2 (``ValueError`` covers ``ArtifactError``,
#: ``ModelLoadError``, ``UsageError``, ``TextTooShortError`` and ``UnicodeDecodeError``)
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError,
               IsADirectoryError)

__all__ = ["COMMANDS", "USER_ERRORS", "UsageError", "build_parser", "main"]

def _registered() -> dict:
    """The commands other packages add (the harness's ``eval``, ``bench``, ``analyze``): the ``echokv.commands``
    entry points, each a module with ``HELP``, ``CONFIGS`` and ``run``."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in sorted(entry_points(group="echokv.commands"), key=lambda ep: ep.name)}


COMMANDS = {"info": info, "train": train, "generate": generate, "demo": demo, **_registered()}
#: the commands that split their work over torchrun's processes
DATA_PARALLEL = ("train", "eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echokv",
                                description="EchoKV KV-cache compression for Hugging Face causal LMs")
    debug = "show the Python traceback of an error instead of one line"
    p.add_argument("--debug", action="store_true", help=debug)
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        s = sub.add_parser(name, help=module.HELP)
        add_options(s, *module.CONFIGS)
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
        s.set_defaults(run=module.run)
    return p


class _ProgressSafeHandler(logging.Handler):
    """Log lines on stderr that do not break tqdm's progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _show_library_messages() -> None:
    logger = logging.getLogger("echokv")
    if not any(isinstance(h, _ProgressSafeHandler) for h in logger.handlers):
        logger.addHandler(_ProgressSafeHandler())
    logger.setLevel(logging.INFO)


def error_line(exc: BaseException) -> str:
    """The one line a user sees for ``exc``."""
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc}); save it as UTF-8"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        name = str(exc.filename or "")
        return f"{name[:40]}... ({len(name)} characters): the name is too long for the filesystem; pass a shorter path"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines())


def _run_data_parallel(args) -> int:
    """One of torchrun's processes: join the group (this rank's device), run, leave."""
    if args.command not in DATA_PARALLEL:
        raise UsageError(f"echokv {args.command} does not run data-parallel; run it without torchrun (echokv "
                         f"{' and '.join(DATA_PARALLEL)} do)")
    args.device = distributed.init(args.device)
    try:
        if not distributed.is_main():  # rank 0 speaks for all
            logging.getLogger("echokv").setLevel(logging.ERROR)
        return args.run(args) or 0
    finally:
        distributed.shutdown()


def _interrupted(args, started: float) -> str:
    """The line Ctrl-C ends with: what the run kept (an output written whole before it, ``eval``'s finished rows,
    which ``--resume`` keeps), or that nothing was written (unfinished outputs are removed on the way out)."""
    out = getattr(args, "out", None)
    folder = None if out is None else Path(str(out)).expanduser()
    kept = []
    if folder is not None and folder.is_dir():
        with contextlib.suppress(OSError):
            kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                          if p.is_file() and p.stat().st_mtime >= started)
    if not kept:
        return "interrupted; nothing written"
    shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
    again = " (run it again with --resume to finish it)" if args.command == "eval" else ""
    return f"interrupted; kept what was finished in {folder}: {shown}{again}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_messages()
    where = f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: " if distributed.launched() else ""
    started = time.time() - 1  # file times are coarser than the clock on some filesystems
    try:
        check_outputs_are_not_inputs(args, COMMANDS[args.command].CONFIGS)
        return _run_data_parallel(args) if distributed.launched() else args.run(args) or 0
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the run was
        if args.debug:
            raise
        print(f"echokv: {where}{_interrupted(args, started)}", file=sys.stderr)
        return 130
    except (*USER_ERRORS, OSError, distributed.PeerLost) as exc:
        if args.debug:
            raise
        print(f"echokv: error: {where}{error_line(exc)}", file=sys.stderr)
        # another OSError or a lost rank is the machine's, not the input's (1), but for a path too long
        return 2 if isinstance(exc, USER_ERRORS) or getattr(exc, "errno", None) == errno.ENAMETOOLONG else 1
