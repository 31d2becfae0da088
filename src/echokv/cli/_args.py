"""Command-line flags made from the configuration dataclasses of :mod:`echokv.config`, and back.

Every field becomes a flag: ``--kebab-case`` of its name plus its ``aliases``, its type from the annotation
(``X | None`` as X; ``list[str]`` as one or more values; ``bool``: ``--name`` when it defaults to False,
``--no-name`` when it defaults to True), its ``choices`` and value ``check``, and its help with the default.
A field without a default is a required flag; fields tagged ``one_of`` form a required exclusive group.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input."""


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"compression ratio must be in [0, 1) (fraction of the cache removed), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


CHECKS = {"ratio": _ratio, "positive": _positive, "non_negative": _non_negative}


def _unwrap(hint):
    """``X | None`` -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def flags(field: dataclasses.Field) -> list[str]:
    """The flags of a field (the first one is its kebab-case name)."""
    name = field.name.replace("_", "-")
    if field.default is True:
        return [f"--no-{name}"]
    return [f"--{name}", *field.metadata.get("aliases", ())]


def add_options(parser: argparse.ArgumentParser, *classes) -> None:
    """Add a flag for every field of the dataclasses ``classes``."""
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            meta = field.metadata
            hint = _unwrap(hints[field.name])
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            kwargs: dict = {"dest": field.name, "help": meta.get("help", "")}
            if hint is bool:
                kwargs["action"] = "store_false" if field.default else "store_true"
                if field.default:
                    kwargs["help"] = f"turn off: {kwargs['help']}"
            else:
                if typing.get_origin(hint) is list:
                    kwargs["nargs"] = "+"
                    hint = typing.get_args(hint)[0]
                kwargs["type"] = CHECKS.get(meta.get("check"), hint)
                if meta.get("check") == "ratio":
                    kwargs["metavar"] = "RATIO"
                if meta.get("choices"):
                    kwargs["choices"] = list(meta["choices"])
                if required:
                    kwargs["required"] = True
                elif field.default is not None:
                    kwargs["help"] += f" (default: {field.default})"
            if not required:
                kwargs["default"] = field.default
            tag = meta.get("one_of")  # a required group of which exactly one is given
            if tag and tag not in exclusive:
                exclusive[tag] = parser.add_mutually_exclusive_group(required=True)
            (exclusive[tag] if tag else parser).add_argument(*flags(field), **kwargs)


def from_args(args: argparse.Namespace, cls):
    """The dataclass ``cls`` built from parsed flags."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def _paths(args: argparse.Namespace, classes, role: str) -> list[tuple[str, Path]]:
    """(flag, path) of every value of the fields tagged ``role`` (:func:`echokv.config.option`)."""
    found = []
    for cls in classes:
        for field in dataclasses.fields(cls):
            value = getattr(args, field.name, None)
            if field.metadata.get("role") != role or value is None:
                continue
            for v in value if isinstance(value, list) else [value]:
                found.append((flags(field)[0], Path(str(v)).expanduser()))
    return found


def check_outputs_are_not_inputs(args: argparse.Namespace, classes) -> None:
    """Refuse an output folder that is, or holds, one of the command's inputs (``analyze --artifact A --out A
    --overwrite`` would replace the artifact it reads): every command, before any work."""
    for out_flag, out in _paths(args, classes, "output"):
        target = out.resolve()
        for in_flag, src in _paths(args, classes, "input"):
            if not (src.exists() or src.is_symlink()):
                continue  # a model name, or a path that a later check reports
            read = src.resolve()
            if read == target or read.is_relative_to(target):
                what = "is" if read == target else "holds"
                raise UsageError(f"{out_flag} {out} {what} an input of this command ({in_flag} {src}): echokv never "
                                 f"writes over what it reads; pass another {out_flag}")
