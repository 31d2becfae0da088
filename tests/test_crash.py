"""Killed runs (issue #16): an artifact write killed at any point never leaves a folder that looks complete, nor a
partial one a later run would take for an artifact, and the next write tidies what it left.

Two tests: every filesystem step of ``artifact.save`` killed in turn (in-process: from the kill on, nothing runs,
as after SIGKILL, not even the cleanup), and ``echokv train`` on a tiny model killed with SIGKILL at random times.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echokv import artifact, util
from echokv.artifact import ArtifactError, validate_artifact
from helpers import train_tiny


class _Killed(BaseException):
    pass


_STEPS = [(Path, "mkdir"), (Path, "rename"), (Path, "rmdir"), (Path, "unlink"), (Path, "write_bytes"),
          (Path, "write_text"), (os, "replace"), (shutil, "rmtree"), (artifact, "save_file"), (util, "_exchange")]


def _kill_at(mp: pytest.MonkeyPatch, step: int) -> dict:
    """Count the filesystem steps; at ``step`` the process 'dies': this one and every later step do nothing."""
    state = {"n": 0, "dead": False}

    def wrap(fn):
        def step_fn(*args, **kwargs):
            if state["dead"]:
                return None
            state["n"] += 1
            if state["n"] == step:
                state["dead"] = True
                raise _Killed
            return fn(*args, **kwargs)

        return step_fn

    for owner, name in _STEPS:
        mp.setattr(owner, name, wrap(getattr(owner, name)))
    return state


def _check_left(parent: Path, versions: set[int], must_exist: bool) -> None:
    """``parent/a`` is absent or a complete artifact of one of ``versions``; anything else is an unfinished write
    that is refused as an artifact."""
    out = parent / "a"
    if must_exist or out.exists():
        config = validate_artifact(out)
        assert config["training"]["seed"] in versions
        assert json.loads((out / artifact.REPORT).read_text())["config"]["seed"] == config["training"]["seed"]
    for entry in parent.iterdir():
        if entry.name == "a":
            continue
        assert util.is_unfinished_output(entry), entry
        if entry.is_dir():
            with pytest.raises(ArtifactError, match="unfinished output of an interrupted echokv run"):
                validate_artifact(entry)


@pytest.fixture(scope="module")
def trained():
    from echokv.tiny import tiny_model

    model = tiny_model()
    return model, train_tiny(model, steps=0)[0]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_save_killed_at_every_step(tmp_path, trained, existing, exchange):
    model, recon = trained
    step, completed = 0, False
    while not completed:
        step += 1
        parent = tmp_path / f"run{step}"
        parent.mkdir()
        if existing:
            artifact.save(recon, model, parent / "a", {"config": {"seed": 1}})
        with pytest.MonkeyPatch.context() as mp:
            if not exchange:
                mp.setattr(util, "_exchange", lambda a, b: False)
            state = _kill_at(mp, step)
            try:
                artifact.save(recon, model, parent / "a", {"config": {"seed": 2}}, overwrite=existing)
            except _Killed:
                pass
            completed = not state["dead"]
        # the exchange is atomic: the previous artifact is in place until the new one is
        _check_left(parent, {1, 2} if existing else {2}, must_exist=existing and exchange)
        if completed:
            assert validate_artifact(parent / "a")["training"]["seed"] == 2
        # the next run (the killed one's process is gone) finds nothing in its way and tidies up
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(util, "_alive", lambda pid: False)
            artifact.save(recon, model, parent / "a", {"config": {"seed": 3}}, overwrite=True)
        assert [p.name for p in parent.iterdir()] == ["a"]
        assert validate_artifact(parent / "a")["training"]["seed"] == 3
    assert step > 8  # every step of the write was killed once


# -- echokv train, killed with SIGKILL ------------------------------------------------------------------------

TRAIN = ["train", "--model", "tiny-llama", "--calib-tokens", "256", "--seq-len", "32", "--heldout-tokens", "64",
         "--steps", "1", "--stage2-sequences", "2", "--stage2-batch", "1", "--no-progress"]


def _train(cwd: Path, out: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(util.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "echokv", *TRAIN, "--text", "text.txt", "--out", out, *extra],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_echokv_train_killed_with_sigkill(tmp_path):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "wizards", "judge"]
    rng = random.Random(16)
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    start = time.monotonic()
    proc = _train(tmp_path, "a")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    whole = time.monotonic() - start
    first = validate_artifact(tmp_path / "a")

    seed = int(time.time())
    rng = random.Random(seed)
    for out, extra in (("a", ["--overwrite"]), ("b", []), ("b", [])):
        at = rng.uniform(0.3, 1.0) * whole  # before 0.3 the process is still importing
        proc = _train(tmp_path, out, *extra)
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        note = f"killed {out} at {at:.1f} s of {whole:.1f} s (seed {seed})"
        # "a" is always a complete artifact (the previous one or the new one); "b" is absent or complete
        assert (tmp_path / "a").is_dir(), note
        for name in ("a", "b"):
            if (tmp_path / name).exists():
                config = validate_artifact(tmp_path / name)
                assert (tmp_path / name / artifact.REPORT).is_file(), note
                assert config["format"] == first["format"]
        for entry in tmp_path.iterdir():
            assert entry.name in ("a", "b", "text.txt") or util.is_unfinished_output(entry), (entry, note)
    # a later run is not misled by what the killed ones left, and removes it
    proc = _train(tmp_path, "b", *(["--overwrite"] if (tmp_path / "b").exists() else []))
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    validate_artifact(tmp_path / "b")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]
