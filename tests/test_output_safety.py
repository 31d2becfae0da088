"""Output folders: `--overwrite` replaces only what echokv wrote, never the current, a parent or the home folder, and
a write that fails or is interrupted leaves nothing that looks complete (issue #16, "Data loss")."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from echokv import artifact, util
from echokv.cli import main
from echokv.util import OutputFolderError, atomic_dir, check_output_dir, foreign_entries
from helpers import train_tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model, its reconstructor and report, and one artifact written from them."""
    from echokv.tiny import tiny_model

    model = tiny_model()
    recon, report = train_tiny(model, steps=0)
    path = tmp_path_factory.mktemp("saved") / "art"
    artifact.save(recon, model, path, report)
    return model, recon, report, path


def _no_model_load(monkeypatch):

    def boom(config):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("echokv.models.load_configured", boom)


def _user_files(folder: Path) -> dict[str, str]:
    (folder / "important.txt").write_text("the user's notes")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "x.csv").write_text("1,2")
    return {"important.txt": "the user's notes", "data/x.csv": "1,2"}


def _still_there(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text() == text, f"{name} was lost"


def test_save_to_the_current_folder_is_refused_and_deletes_nothing(saved, tmp_path, monkeypatch):
    # issue #16: artifact.save(..., ".", overwrite=True) deleted every file of the current folder
    model, recon, report, _ = saved
    files = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for out in (".", tmp_path, "./"):
        with pytest.raises(OutputFolderError, match="the current folder"):
            artifact.save(recon, model, out, report, overwrite=True)
    _still_there(tmp_path, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "important.txt"]  # no hidden leftovers


def test_a_parent_of_the_current_folder_and_the_home_folder_are_refused(saved, tmp_path, monkeypatch):
    model, recon, report, _ = saved
    work = tmp_path / "project" / "runs"
    work.mkdir(parents=True)
    files = _user_files(tmp_path / "project")
    monkeypatch.chdir(work)
    for out in ("..", tmp_path, "/"):
        with pytest.raises(OutputFolderError, match="a parent of the current folder|the root folder"):
            artifact.save(recon, model, out, report, overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputFolderError, match="your home folder"):
        artifact.save(recon, model, "~", report, overwrite=True)
    with pytest.raises(OutputFolderError, match="your home folder"):
        check_output_dir(home, overwrite=False)
    _still_there(tmp_path / "project", files)


def test_overwrite_refuses_a_folder_with_foreign_files_and_names_them(saved, tmp_path):
    # issue #16: `analyze --out DIR --overwrite` deleted a user's important.txt; train used the same rmtree
    model, recon, report, art = saved
    import shutil

    out = tmp_path / "a"
    shutil.copytree(art, out)
    files = _user_files(out)
    with pytest.raises(OutputFolderError, match=r"holds files echokv did not write \(data/x.csv, important.txt\)"):
        artifact.save(recon, model, out, report, overwrite=True)
    _still_there(out, files)
    artifact.validate_artifact(out)  # the artifact in it is untouched too


def test_overwrite_replaces_echokv_output_and_only_it(saved, tmp_path):
    model, recon, report, _ = saved
    out = tmp_path / "a"
    artifact.save(recon, model, out, report, stage1_state=recon.state_dict())
    assert (out / artifact.STAGE1_WEIGHTS).is_file()
    with pytest.raises(OutputFolderError, match="already exists; pass --overwrite"):
        artifact.save(recon, model, out, report)
    recon.stage1_state = None
    artifact.save(recon, model, out, report, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "network.safetensors", "train_report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # the previous version is gone, nothing hidden left


def test_a_corrupt_artifact_of_echokv_is_still_its_own(saved, tmp_path):
    # a truncated artifact (a retraining replaces it, e.g. eval's train-on-the-fly) is recognised by its format
    import shutil

    model, recon, report, art = saved
    out = tmp_path / "a"
    shutil.copytree(art, out)
    for name in (artifact.CONFIG, artifact.WEIGHTS):
        (out / name).write_bytes((out / name).read_bytes()[:60])
    assert foreign_entries(out) == []
    artifact.save(recon, model, out, report, overwrite=True)
    artifact.validate_artifact(out)


def test_what_counts_as_echokv_output(tmp_path, saved):
    *_, art = saved
    assert foreign_entries(art) == []
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a model's config, not ours
    (tmp_path / "report.md").write_text("# My report\n")  # a user's report of the same name
    (tmp_path / "results.json").write_text("[]")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(art)
    assert foreign_entries(tmp_path) == ["config.json", "empty/", "link", "report.md"]
    fig = tmp_path / "figures"
    fig.mkdir()
    from echokv import plotting

    plotting.save(plotting.figure((2, 2)), fig / "a.png")
    (fig / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG matplotlib did not draw
    assert foreign_entries(fig) == ["photo.png"]


def test_a_file_and_a_symbolic_link_are_not_replaced(tmp_path, saved):
    *_, art = saved
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputFolderError, match="is not a folder"):
        check_output_dir(f, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(art)
    with pytest.raises(OutputFolderError, match="symbolic link"):
        check_output_dir(link, overwrite=True)
    assert f.read_text() == "x" and link.is_symlink()


def test_files_written_into_a_folder_never_replace_a_users_file(tmp_path):
    # replace=False (eval, demo): other files stay; a user's file of the same name is refused, not replaced
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with atomic_dir(out, overwrite=True, replace=False) as tmp:
        (tmp / "results.json").write_text("[1]")
    assert (out / "results.json").read_text() == "[1]" and (out / "notes.txt").read_text() == "mine"
    with atomic_dir(out, overwrite=True, replace=False) as tmp:  # echokv's own file: replaced
        (tmp / "results.json").write_text("[2]")
    assert (out / "results.json").read_text() == "[2]"
    (out / "report.md").write_text("# My own report")
    with (pytest.raises(OutputFolderError, match=r"same names that echokv did not write \(report.md\)"),
          atomic_dir(out, overwrite=True, replace=False) as tmp):
        (tmp / "report.md").write_text("# EchoKV evaluation")
    assert (out / "report.md").read_text() == "# My own report"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.md", "results.json"]


def _lock(folder: Path, monkeypatch) -> None:
    """Make ``folder`` unwritable (root ignores permissions: there, creating anything in it fails as it would)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self.parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_an_unwritable_output_is_named(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    _lock(locked, monkeypatch)
    with pytest.raises(PermissionError, match=f"cannot write the output {locked / 'a'}: {locked} is not writable"):
        check_output_dir(locked / "a", overwrite=False)
    with pytest.raises(PermissionError, match=f"{locked} is not writable"):  # a folder to create inside it
        check_output_dir(locked / "a" / "b", overwrite=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "a", overwrite=False)


@pytest.mark.parametrize("command", [
    ["train"], ["analyze"], ["bench", "--artifact", "/nonexistent"], ["demo"], ["eval", "--methods", "full"],
])
def test_an_unwritable_output_fails_before_any_work(tmp_path, monkeypatch, capsys, command):
    # issue #16: an unwritable --out failed after training (132 s); train, analyze, eval and bench check it first
    locked = tmp_path / "locked"
    locked.mkdir()
    _lock(locked, monkeypatch)
    _no_model_load(monkeypatch)
    assert main([*command, "--out", str(locked / "out")]) == 2
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_train_refuses_the_current_folder_without_suggesting_overwrite(monkeypatch, capsys, tmp_path):
    # issue #16: `echokv train --out .` answered "pass --overwrite to replace it"
    _no_model_load(monkeypatch)
    _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--out", ".", *extra]) == 2
        err = capsys.readouterr().err
        assert "the current folder" in err and "--overwrite" not in err
    assert (tmp_path / "important.txt").exists()


def test_analyze_overwrite_keeps_a_users_file(monkeypatch, capsys, tmp_path):
    # issue #16: `echokv analyze --out DIR --overwrite` deleted DIR/important.txt
    _no_model_load(monkeypatch)
    out = tmp_path / "analysis"
    out.mkdir()
    files = _user_files(out)
    assert main(["analyze", "--out", str(out), "--overwrite"]) == 2
    assert "important.txt" in capsys.readouterr().err
    _still_there(out, files)


def test_an_error_while_writing_leaves_nothing(saved, tmp_path, monkeypatch):
    model, recon, report, _ = saved

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        artifact.save(recon, model, tmp_path / "a", report)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_refused_as_artifacts_and_cleaned_by_the_next_write(saved, tmp_path):
    import shutil

    model, recon, report, art = saved
    dead = 2**22 + 12345  # above pid_max's default: no such process
    partial = tmp_path / f".a.partial-{dead}-0123abcd"
    shutil.copytree(art, partial)  # killed after writing every file, before the rename
    with pytest.raises(artifact.ArtifactError, match="unfinished output of an interrupted echokv run"):
        artifact.validate_artifact(partial)
    artifact.save(recon, model, tmp_path / "a", report)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_replacement_killed_between_its_two_renames_is_undone(saved, tmp_path, monkeypatch):
    # where the atomic exchange is unavailable, replacing takes two renames; killed between them, the next
    # write puts the previous output back in place before anything else
    import shutil

    model, recon, report, art = saved
    dead = 2**22 + 54321
    old = tmp_path / f".a.old-{dead}-89abcdef"
    shutil.copytree(art, old)
    util.clean_stale(tmp_path / "a")
    assert (tmp_path / "a").is_dir() and not old.exists()
    artifact.validate_artifact(tmp_path / "a")
    monkeypatch.setattr(util, "_exchange", lambda a, b: False)  # the two-rename path itself works
    artifact.save(recon, model, tmp_path / "a", report, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


# -- issue #29: no command writes over its inputs; bench's files; the user's umask ----------------------------------


@pytest.mark.parametrize("argv", [
    ["analyze", "--artifact", "{art}", "--out", "{art}", "--overwrite"],  # deleted the artifact it was analysing
    ["analyze", "--artifact", "{art}", "--out", "{art}"],  # told the user to pass --overwrite
    ["analyze", "--artifact", "{art}", "--out", "{parent}", "--overwrite"],  # a folder holding the input
    ["bench", "--artifact", "{art}", "--out", "{art}"],
    ["eval", "--methods", "full,echokv", "--artifacts", "{art}", "--out", "{art}", "--overwrite"],
    ["train", "--text", "{text}", "--out", "{parent}", "--overwrite"],
    ["analyze", "--model", "{art}", "--out", "{art}", "--overwrite"],
])
def test_no_command_writes_over_its_inputs(saved, tmp_path, monkeypatch, capsys, argv):
    import shutil

    _no_model_load(monkeypatch)
    parent = tmp_path / "work"
    art = parent / "art"
    shutil.copytree(saved[3], art)
    (parent / "notes.txt").write_text("my text " * 50)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    argv = [a.format(art=art, parent=parent, text=parent / "notes.txt") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "an input of this command" in err and "--overwrite" not in err.split(":")[-1]
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before


def test_bench_refuses_to_replace_an_earlier_bench_json_without_overwrite(saved, tmp_path, monkeypatch, capsys):

    def load(config, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("echokv.models.load_configured", load)
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text('{"mine": 1}')
    base = ["bench", "--artifact", str(saved[3]), "--out", str(out), "--contexts", "16"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "already holds bench.json" in err and "--overwrite" in err
    assert (out / "bench.json").read_text() == '{"mine": 1}'
    (out / "decode_speed.png").write_text("a user's picture")  # not echokv's: refused even with --overwrite
    assert main([*base, "--overwrite"]) == 2
    assert "decode_speed.png" in capsys.readouterr().err
    (out / "decode_speed.png").unlink()
    with pytest.raises(AssertionError, match="the model was loaded"):  # with --overwrite the run goes on
        main([*base, "--overwrite"])


def test_outputs_are_written_with_the_users_umask(saved, tmp_path):
    model, recon, report, _ = saved
    old = os.umask(0o027)
    try:
        path = artifact.save(recon, model, tmp_path / "art", report)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes[artifact.WEIGHTS] == 0o640 and set(modes.values()) == {0o640}, modes


def test_the_serving_export_advises_only_its_own_flags(saved, tmp_path, capsys):
    from echokv.serving.export import main as export

    out = tmp_path / "served"
    out.mkdir()
    assert export([str(out)]) == 1  # an existing folder: export never replaces
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" not in err
    assert export([str(tmp_path / "new"), "--model", str(saved[3])]) == 1  # an artifact as the model
    err = capsys.readouterr().err
    assert "is an echokv artifact" in err and "--artifact" not in err and not (tmp_path / "new").exists()


def test_a_served_folder_without_weights_is_one_line(tmp_path):
    from echokv.serving.check import ServeError, _checkpoint_kv

    with pytest.raises(ServeError, match="has no weights"):
        list(_checkpoint_kv(tmp_path, 2))


def test_an_output_the_filesystem_refuses_names_the_users_path(tmp_path, monkeypatch):
    # issue #29: under /proc the probe's own hidden path was named
    real = Path.mkdir

    def refuse(self, *args, **kwargs):
        if ".probe-" in self.name:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(FileNotFoundError) as err:
        check_output_dir(tmp_path / "out", overwrite=False)
    from echokv.cli import error_line

    line = error_line(err.value)
    assert line.startswith(f"cannot write the output {tmp_path / 'out'}") and ".probe-" not in line
