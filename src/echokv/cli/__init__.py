"""The ``echokv`` command line: info, train, generate, analyze, eval, bench, demo (one module each).

Each command module has ``HELP``, ``CONFIGS`` (the dataclasses of :mod:`echokv.config` its flags are
made from) and ``run(args)``: cheap checks (ranges, files, folders) before the model is loaded, checks
that need the model (geometry, artifact fingerprint, context length) right after loading, then the
library call, then printing.
Library messages (``logging.getLogger("echokv")``) are shown on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import analyze, bench, demo, eval, generate, info, train
from ._args import UsageError, add_options

COMMANDS = {"info": info, "train": train, "generate": generate, "analyze": analyze, "eval": eval, "bench": bench,
            "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="echokv",
                                description="EchoKV KV-cache compression for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        s = sub.add_parser(name, help=module.HELP)
        add_options(s, *module.CONFIGS)
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


def main(argv: list[str] | None = None) -> int:
    from ..artifact import ArtifactError
    from ..models import ModelLoadError

    args = build_parser().parse_args(argv)
    _show_library_messages()
    try:
        return args.run(args) or 0
    except (UsageError, ModelLoadError, ArtifactError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"echokv: error: {exc}", file=sys.stderr)
        return 2
