"""Any combination of the command line's options either runs (gets as far as loading the model) or is refused with
exit code 2 and one line, never a traceback (issue #29, item 7). Argument parsing and the checks before the model
loads only: the load itself is replaced, so every example takes milliseconds."""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from echokv.cli import build_parser, main


class Reached(Exception):
    """The command got past every check that needs no model."""


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _subcommands()


@pytest.fixture(scope="module")
def places():
    """Paths a user might pass: a text file, an empty folder, a folder with a file, a missing path, a binary file,
    an artifact-like folder (config.json that is not an artifact's), a device map, a real artifact."""
    root = Path(tempfile.mkdtemp(prefix="echokv-props-"))
    (root / "text.txt").write_text("Some words of text. " * 200)
    (root / "empty").mkdir()
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("mine")
    (root / "binary.bin").write_bytes(bytes(range(256)))
    (root / "fake").mkdir()
    (root / "fake" / "config.json").write_text('{"format": "something else"}')
    (root / "map.json").write_text('{"": "cpu"}')
    from echokv import artifact
    from echokv.tiny import tiny_model
    from helpers import train_tiny

    model = tiny_model()
    recon, report = train_tiny(model, steps=0)
    artifact.save(recon, model, root / "art", report)  # a real artifact (of a tiny model)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _values(root: Path):
    paths = [str(root / n) for n in ("text.txt", "empty", "full", "missing", "binary.bin", "fake", "map.json", "art",
                                     "art", "art")]
    words = ["", " ", "none", "auto", "0", "-1", "1", "0.5", "0.5,0.7", "0.5,0.5", "1.5", "nan", "inf", "1e99",
             "4x", "0x", "10", "190MB", "-3GB", "0-3", "3-1", "a,b", "x" * 300, "tiny-llama", "cpu", "meta", "cuda:7",
             '{"a": 1}', "{", "full,echokv", "all", "quick", "0=70GiB"]
    return st.sampled_from(paths + words) | st.text(max_size=12)


def _numbers():
    return st.integers(-5, 10**12).map(str) | st.floats(allow_nan=True, allow_infinity=True).map(repr)


def _typed(action):
    """Values of the option's own type, in range and out of it."""
    from echokv.cli import _args

    kind = action.type
    if kind in (int, _args._positive, _args._non_negative):
        return _mostly(st.integers(1, 5000).map(str), st.sampled_from(["0", "-1", "1000000000000", "2.5"]))
    if kind in (float, _args._ratio):
        return _mostly(st.sampled_from(["0", "0.3", "0.5", "0.75", "0.9", "0.99"]),
                       st.sampled_from(["1", "-0.1", "2", "1e-9", "nan"]))
    return None


def _mostly(valid, invalid):
    """``valid`` nine times in ten."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 9 else valid)


@st.composite
def command_lines(draw, root: Path, name: str):
    argv = [name]
    for action in COMMANDS[name]._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.dest == "debug" or not (action.required or draw(st.integers(0, 3)) == 3):
            continue
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
            continue
        pool = _values(root)
        if action.choices:
            pool = _mostly(st.sampled_from(list(action.choices)), _values(root))
        elif _typed(action) is not None:
            pool = _typed(action)
        if draw(st.integers(0, 29)) == 29:  # now and then anything at all
            pool = _values(root) | _numbers()
        if action.dest in ("artifact", "artifacts") and draw(st.booleans()):
            pool = st.just(str(root / "art"))
        if action.dest == "out":  # outputs under the scratch folder only
            pool = st.sampled_from([str(root / "outs" / "a"), str(root / "full"), str(root / "text.txt"),
                                    str(root / "empty"), str(root / "fake")])
        count = draw(st.integers(1, 2)) if action.nargs == "+" else 1
        argv += [flag, *(draw(pool) for _ in range(count))]
    return argv


@pytest.fixture
def no_model(monkeypatch):
    from echokv import kernels

    def load(config, **kwargs):
        raise Reached

    monkeypatch.setattr("echokv.models.load_configured", load)
    monkeypatch.setattr(kernels, "path", lambda kernel="auto", device=None: kernel)  # no C++ build


def _runs_or_is_refused_in_one_line(argv: list[str], event=event) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except Reached:
            event(f"{argv[0]}: runs")
            return
        except SystemExit as exc:  # argparse: its usage, then one error line
            code = exc.code
            event(f"{argv[0]}: refused by argparse")
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2, (argv, code, lines)
    assert "Traceback" not in err.getvalue(), argv
    assert lines and "error: " in lines[-1], (argv, lines)
    ours = [line for line in lines if line.startswith("echokv: error:")]
    assert len(ours) <= 1, (argv, lines)
    if ours:
        event(f"{argv[0]}: refused by echokv")


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_command_line_runs_or_is_refused_in_one_line(places, no_model, command, data):
    _runs_or_is_refused_in_one_line(data.draw(command_lines(places, command)))


LONG = "x" * 300


@pytest.mark.parametrize("argv", [
    ["bench", "--artifact", ""],  # a TypeError's traceback
    ["analyze", "--artifact", "", "--out", "{root}/outs/b"],
    ["bench", "--artifact", LONG],  # a path too long for the filesystem: exit code 1, as if the disk had failed
    ["analyze", "--out", LONG],
    ["eval", "--artifacts", LONG, "--out", "{root}/outs/c"],
    ["info", "--model", LONG],
])
def test_what_the_property_found_is_one_line(places, no_model, argv):
    _runs_or_is_refused_in_one_line([a.replace("{root}", str(places)) for a in argv], event=lambda _: None)
