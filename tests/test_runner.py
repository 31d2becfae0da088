"""The evaluation runner (echokv_lab.eval.runner), its suites and perplexity rows.

Tiny random Llamas with the SmolLM2 vocabulary stand in for a real model (their answers are noise:
these tests check the plumbing, the files and the errors); one test runs a reduced quick suite on
the real SmolLM2-135M and checks that the full cache scores above chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from echokv_lab.eval import runner, suites
from echokv_lab.eval.suites import PERPLEXITY


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """(model, tokenizer): a tiny random Llama whose vocabulary fits the SmolLM2 tokenizer."""
    from echokv.tiny import tiny_model

    return tiny_model("llama", vocab_size=len(smollm2_tokenizer)), smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny_artifact(tiny, tmp_path_factory):
    """A head-only EchoKV artifact (variant heads) at ratio 0.5 for the tiny model (2 stage-2 steps, random blocks)."""
    from echokv import artifact
    from echokv.training import TrainConfig, train

    model, tokenizer = tiny
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, len(tokenizer), (8, 64), generator=gen)
    held = torch.randint(0, len(tokenizer), (2, 64), generator=gen)
    recon, report = train(model, None, TrainConfig(compression_ratio=0.5, stage2_steps=2, progress=False, variant="heads"),
                          calib=calib, held=held)
    return str(artifact.save(recon, model, tmp_path_factory.mktemp("art") / "tiny-0.5", report))


# -- suites ----------------------------------------------------------------------------------------


def test_quick_suite_defaults():
    plan = suites.resolve("quick")
    assert plan.tasks == list(suites.QUICK_TASKS)
    assert plan.context_lengths == list(suites.QUICK_LENGTHS)
    assert plan.samples == suites.QUICK_SAMPLES
    assert plan.perplexity is not None and plan.max_new_tokens == suites.QUICK_MAX_NEW_TOKENS
    # n per method: enough that a 10-point difference is about two binomial standard errors
    n = len(plan.tasks) * len(plan.context_lengths) * plan.samples
    assert n >= 100 and (0.25 / n) ** 0.5 <= 0.05


def test_suite_overrides_and_errors():
    plan = suites.resolve("quick", tasks="niah_single_1", context_lengths="256,512", samples=3)
    assert plan.tasks == ["niah_single_1"] and plan.perplexity is None
    assert plan.context_lengths == [256, 512] and plan.samples == 3
    assert suites.resolve("quick", tasks=["perplexity"]).tasks == []
    ppl = suites.resolve("ppl", context_lengths="256", samples=2).perplexity
    assert (ppl.sequences, ppl.seq_len) == (2, 256)
    with pytest.raises(ValueError, match="unknown task.*known tasks"):
        suites.resolve("ruler", tasks="niah_single_1,nope")
    with pytest.raises(ValueError, match="unknown suite"):
        suites.resolve("huge")
    with pytest.raises(ValueError, match="not an integer"):
        suites.resolve("ruler", context_lengths="1k")


def test_context_lengths_against_the_model():
    plan = suites.resolve("ruler")  # defaults 1024, 2048, 4096: clipped to what the model holds
    plan.check_model(2048)
    assert plan.context_lengths == [1024] and plan.notes
    explicit = suites.resolve("ruler", context_lengths="1024,4096")
    with pytest.raises(ValueError, match="4096.*context of 2048"):
        explicit.check_model(2048)


# -- validation before any work ----------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the runner gets as far as building inputs (the first real work)."""

    def fail(*args, **kwargs):
        raise AssertionError("the runner started work before rejecting its input")

    monkeypatch.setattr(runner, "build_inputs", fail)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": ["full", "bogus"]}, ValueError, "unknown method.*bogus.*known methods: full"),
        ({"ratios": [1.0]}, ValueError, r"\[0, 1\)"),
        ({"ratios": "0.5,-0.1"}, ValueError, r"\[0, 1\)"),
        ({"tasks": "niah_single_1,nope"}, ValueError, "unknown task"),
        ({"context_lengths": "4096"}, ValueError, "do not fit the model's context of 2048"),
        ({"artifacts": ["/nonexistent/artifact"]}, ValueError, "artifact folder not found"),
    ],
)
def test_bad_input_fails_before_work(tiny, no_work, tmp_path, kwargs, error, match):
    model, tokenizer = tiny
    args = {"suite": "quick", "methods": ["full", "echokv"], "ratios": [0.5], "out": tmp_path / "out", **kwargs}
    with pytest.raises(error, match=match):
        runner.run_eval(model, tokenizer, progress=False, **args)
    assert not (tmp_path / "out").exists()


def test_existing_out_folder_and_foreign_artifact(tiny, no_work, tmp_path, smollm2_tokenizer):
    from echokv.artifact import ArtifactError
    from echokv.tiny import tiny_model

    model, tokenizer = tiny
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        runner.run_eval(model, tokenizer, "quick", ["full"], [], out=tmp_path / "out", progress=False)
    # an artifact trained for another model (other K/V weights) is refused before work
    from echokv import artifact
    from echokv.training import TrainConfig, train

    other = tiny_model("llama", seed=1, vocab_size=len(smollm2_tokenizer))
    blocks = torch.randint(0, 1000, (4, 32))
    recon, report = train(other, None, TrainConfig(stage2_steps=0, progress=False), calib=blocks, held=blocks[:1])
    path = artifact.save(recon, other, tmp_path / "other", report)
    with pytest.raises(ArtifactError, match="different model"):
        runner.run_eval(model, tokenizer, "quick", ["echokv"], [0.5], artifacts=[str(path)], progress=False)


def test_longbench_suite_needs_valid_data(tmp_path):
    with pytest.raises(ValueError, match="needs --data"):
        runner.make_job("longbench", ["full"], [])
    with pytest.raises(FileNotFoundError, match="LongBench data folder"):
        runner.make_job("longbench", ["full"], [], data=tmp_path / "missing")
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "hotpotqa.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="hotpotqa.jsonl, line 1"):
        runner.make_job("longbench", ["full"], [], data=tmp_path / "lb", tasks="hotpotqa")


def test_cli_rejects_before_loading_the_model(monkeypatch, tmp_path, capsys):
    from echokv import cli

    def no_load(config):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("echokv.models.load_configured", no_load)
    assert cli.main(["eval", "--methods", "full,bogus", "--out", str(tmp_path / "a")]) == 2
    assert "unknown method(s) bogus" in capsys.readouterr().err
    assert cli.main(["eval", "--compression-ratios", "1.2", "--out", str(tmp_path / "b")]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    assert cli.main(["eval", "--methods", "full", "--out", str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err


# -- runs --------------------------------------------------------------------------------------------


def test_two_methods_write_results(tiny, tiny_artifact, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "eval"
    rows = runner.run_eval(
        model, tokenizer, "quick", ["full", "echokv-heads"], [0.5], artifacts=[tiny_artifact],
        tasks="niah_single_1,perplexity", context_lengths="200", samples=2, out=out, progress=False,
    )
    assert (out / "results.json").is_file() and (out / "report.md").is_file()
    assert list(out.glob("*.png"))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * 2

    assert not [r for r in rows if r.get("error")]
    task_rows = [r for r in rows if r["task"] == "niah_single_1"]
    assert {(r["method"], r["compression_ratio"]) for r in task_rows} == {("full", 0.0), ("echokv-heads", 0.5)}
    for r in task_rows:
        assert 0.0 <= r["score"] <= 1.0 and r["n"] == 1 and r["context_length"] == 200
        assert r["depth"] in suites.QUICK_DEPTHS and r["seconds"] >= 0
    full = [r for r in task_rows if r["method"] == "full"]
    echo = [r for r in task_rows if r["method"] == "echokv-heads"]
    assert all(r["kept_fraction"] == 1.0 for r in full)
    # measured from the cache: about half of it (the question and answer add a few full tokens)
    assert all(0.45 < r["kept_fraction"] < 0.6 for r in echo)
    assert echo[0]["cache_bytes"] < full[0]["cache_bytes"]

    ppl = {r["method"]: r for r in rows if r["task"] == PERPLEXITY}
    assert set(ppl) == {"full", "echokv-heads"}
    for r in ppl.values():
        assert r["perplexity"] > 1 and abs(r["score"] - 1 / r["perplexity"]) < 1e-12
        assert r["tokens"] == suites.QUICK_PPL_SEQUENCES * (suites.PPL_SEQ_LEN - 1)
    assert ppl["echokv-heads"]["kept_fraction"] < 0.6
    report = (out / "report.md").read_text()
    assert "## Perplexity" in report and "echokv-heads" in report
    # every row says what its method is: measured kept fraction aside, the method's own report
    for r in rows:
        info = r["method_info"]
        assert info["method"] == ("full" if r["method"] == "full" else "echokv-heads@0.5")
        assert {"achieved_kept_fraction", "parameter_bytes"} <= set(info)
    assert echo[0]["method_info"]["parameter_bytes"] > 0 and echo[0]["method_info"]["variant"] == "heads"
    assert full[0]["method_info"]["achieved_kept_fraction"] == 1.0


def test_failing_method_gets_error_rows(tiny, monkeypatch, tmp_path):
    from echokv_lab import methods
    from echokv_lab.methods import MethodUnavailable

    real = methods.make_method

    def make(name, ratio, artifacts=None, **kwargs):
        if name == "lowrank":
            raise RuntimeError("lowrank broke (test)")
        if name == "headdrop":
            raise MethodUnavailable("headdrop is not available on this model (test)")
        return real(name, ratio, artifacts, **kwargs)

    monkeypatch.setattr(methods, "make_method", make)
    model, tokenizer = tiny
    out = tmp_path / "eval"
    rows = runner.run_eval(model, tokenizer, "quick", "full,lowrank,headdrop", "0.5", tasks="niah_single_1",
                           context_lengths="200", samples=1, out=out, progress=False)
    errors = [r for r in rows if r.get("error")]
    assert errors and all(r["method"] == "lowrank" and "broke" in r["error"] for r in errors)
    skipped = [r for r in rows if r.get("skipped")]  # unavailable here: a row that says why, not an error
    assert skipped and all(r["method"] == "headdrop" and "not available" in r["skipped"] for r in skipped)
    assert [r for r in rows if r["method"] == "full" and "score" in r]
    report = (out / "report.md").read_text()
    assert "broke" in report and "not available" in report


def test_artifact_of_the_other_variant_is_an_error_not_a_training(tiny_artifact, tmp_path, monkeypatch):
    # the user's head-only artifact must not make echokv-hybrid train one silently on the fly: asked for by name,
    # it is the user's mistake (an error before any work); brought in by `all`, that method is skipped
    from echokv_lab import methods

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'heads' variant but echokv-hybrid needs the 'hybrid' variant"):
        runner.make_job("quick", "full,echokv-hybrid", "0.5", artifacts=[tiny_artifact],
                        tasks="niah_single_1", context_lengths="200", samples=1)
    with pytest.raises(ValueError, match=r"'heads' variant but echokv-hybrid needs the 'hybrid' variant"):
        methods.make_method("echokv-hybrid", 0.5, [tiny_artifact])
    job = runner.make_job("quick", "all", "0.5", artifacts=[tiny_artifact], tasks="niah_single_1",
                          context_lengths="200", samples=1, peers="off")
    assert "--variant mix" in job.skipped[("echokv", 0.5)]
    assert ("echokv-heads", 0.5) not in job.skipped
    assert not (tmp_path / "runs").exists()


def test_cli_other_variant_exits_2_without_traceback(tiny_artifact, tmp_path, monkeypatch, capsys):
    from echokv import cli

    monkeypatch.setattr("echokv.models.load_configured", lambda self: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = cli.main(["eval", "--methods", "echokv", "--artifacts", tiny_artifact, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "'heads' variant but echokv needs the 'mix' variant" in err and "Traceback" not in err


def test_missing_artifact_is_skipped_with_a_message_and_no_training(tiny, tiny_artifact, tmp_path, monkeypatch):
    from echokv import training

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(training, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    model, tokenizer = tiny
    rows = runner.run_eval(model, tokenizer, "quick", "full,echokv-heads", "0.5,0.75", artifacts=[tiny_artifact],
                           tasks="niah_single_1", context_lengths="200", samples=1, progress=False)
    skipped = [r for r in rows if r.get("skipped")]
    assert skipped and {r["compression_ratio"] for r in skipped} == {0.75}
    message = skipped[0]["skipped"]
    assert "no heads artifact for ratio 0.75" in message and "tiny-0.5 (heads, ratio 0.5)" in message
    assert "--train-missing" in message
    assert [r for r in rows if r["method"] == "echokv-heads" and r["compression_ratio"] == 0.5 and "score" in r]
    assert not (tmp_path / "runs").exists()
    job = runner.make_job("quick", "echokv-heads", "0.75", artifacts=[tiny_artifact], train_missing=True)
    assert not job.skipped and any("trained on the fly" in n for n in job.notes)


def test_resume_skips_cells_already_in_results(tiny, tmp_path, monkeypatch):
    from echokv_lab.methods.base import Method

    model, tokenizer = tiny
    out = tmp_path / "eval"
    args = {"tasks": "niah_single_1", "context_lengths": "200", "samples": 2, "out": out, "progress": False}
    first = runner.run_eval(model, tokenizer, "quick", "full", [], **args)
    calls = []
    real = Method.generate

    def counting(self, *a, **k):
        calls.append(self.label)
        return real(self, *a, **k)

    monkeypatch.setattr(Method, "generate", counting)
    with pytest.raises(FileExistsError):
        runner.run_eval(model, tokenizer, "quick", "full,headdrop", "0.5", **args)
    rows = runner.run_eval(model, tokenizer, "quick", "full,headdrop", "0.5", resume=True, **args)
    assert calls and set(calls) == {"headdrop@0.5"}  # full's cells were in results.json
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert [r for r in saved if r["method"] == "full"] == json.loads(json.dumps(first))
    assert {r["method"] for r in saved} == {"full", "headdrop"}
    with pytest.raises(ValueError, match="another run.*seed"):
        runner.run_eval(model, tokenizer, "quick", "full", [], resume=True, seed=1, **args)


@pytest.mark.parametrize(("change", "named"), [
    ({"dtype": "float32"}, "dtype: bfloat16 there, float32 now"),
    ({"model_name": "other-model"}, "model: tiny-llama there, other-model now"),
    ({"seed": 3}, "seed: 0 there, 3 now"),
    ("weights", "artifacts: their weights differ"),
])
def test_resume_refuses_a_run_that_would_change_the_rows_naming_the_setting(tiny_artifact, tmp_path, change, named):
    from echokv.artifact import WEIGHTS, sha256_file

    out = tmp_path / "eval"
    settings = {"tasks": "niah_single_1", "context_lengths": "200", "samples": 1, "out": out,
                "model_name": "tiny-llama", "dtype": "bfloat16", "artifacts": [tiny_artifact]}
    recorded = runner.make_job("quick", "full", [], **settings).description()
    assert recorded["artifacts"] == [sha256_file(Path(tiny_artifact) / WEIGHTS)]
    out.mkdir()
    if change == "weights":  # an earlier run with an artifact of the same name but other weights
        recorded["artifacts"] = ["0" * 64]
    (out / runner.JOB_FILE).write_text(json.dumps(recorded))
    if change != "weights":
        runner.make_job("quick", "full", [], resume=True, **settings)  # the same settings resume
        settings.update(change)
    with pytest.raises(ValueError, match=f"another run.*{named}") as err:
        runner.make_job("quick", "full", [], resume=True, **settings)
    assert "\n" not in str(err.value)


def test_results_are_written_after_every_method(tiny, monkeypatch, tmp_path):
    # a long run stopped in its second method keeps the first method's results on disk
    from echokv_lab import methods

    real = methods.make_method

    def make(name, ratio, artifacts=None, **kwargs):
        if name == "headdrop":
            raise KeyboardInterrupt
        return real(name, ratio, artifacts, **kwargs)

    monkeypatch.setattr(methods, "make_method", make)
    model, tokenizer = tiny
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tokenizer, "quick", "full,headdrop", "0.5", tasks="niah_single_1",
                        context_lengths="200", samples=1, out=out, progress=False)
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"full"} and all("score" in r for r in rows)


def test_lengths_get_independent_samples(tiny):
    model, tokenizer = tiny
    job = runner.make_job("quick", ["full"], [], tasks="niah_single_1", context_lengths="200,300", samples=2)
    inputs = runner.build_inputs(job, model, tokenizer, progress=False)
    answers: dict[int, list] = {}
    for keys, samples in inputs.cells:
        answers.setdefault(keys["context_length"], []).extend(s.answers[0] for s in samples)
    assert len(answers[200]) == 2 and not set(answers[200]) & set(answers[300])  # other needles
    again = runner.build_inputs(job, model, tokenizer, progress=False)
    assert [[s.context for s in ss] for _, ss in again.cells] == [[s.context for s in ss] for _, ss in inputs.cells]


def test_eos_ids_include_the_chat_end_token(smollm2_tokenizer):
    ids = runner.eos_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert smollm2_tokenizer.eos_token_id in ids


@pytest.mark.real_model
def test_quick_suite_full_cache_scores_above_chance(smollm2, tmp_path):
    """A reduced quick suite on SmolLM2-135M: the full cache finds the needle (chance: 0)."""
    model, tokenizer = smollm2
    rows = runner.run_eval(model, tokenizer, "quick", ["full"], [], tasks="niah_single_2", context_lengths="512",
                           samples=4, out=tmp_path / "eval", progress=False)
    scored = [r for r in rows if not r.get("error")]
    n = sum(r["n"] for r in scored)
    mean = sum(r["score"] * r["n"] for r in scored) / n
    assert n == 4 and mean >= 0.5, rows
    assert (tmp_path / "eval" / "report.md").is_file()


def test_the_default_artifact_is_what_the_default_eval_runs(tiny, tmp_path):
    """`echokv train --out A && echokv eval --artifacts A`: eval's default method takes train's default artifact."""
    from echokv import artifact
    from echokv.config import EvalConfig, TrainConfig
    from echokv_lab import methods

    model, tokenizer = tiny
    blocks = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    from echokv.training import train

    recon, report = train(model, None, TrainConfig(stage2_steps=0, progress=False), calib=blocks, held=blocks[:1])
    path = str(artifact.save(recon, model, tmp_path / "A", report))
    cfg = EvalConfig()
    job = runner.make_job(cfg.suite, cfg.methods, cfg.compression_ratios, [path])
    assert [name for name, _ in job.runs] == ["full", "echokv"] and not job.notes
    assert methods.make_method("echokv", TrainConfig().compression_ratio, [path]).artifact == path


def test_two_artifacts_of_one_ratio_and_variant_are_refused(tiny_artifact, tmp_path):
    # issue #29: the second was silently unused
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    with pytest.raises(ValueError, match=f"{tiny_artifact} and {copy} are both heads artifacts .* ratio 0.5"):
        runner.make_job("quick", "echokv-heads", "0.5", artifacts=[tiny_artifact, copy])
    with pytest.raises(ValueError, match="is passed twice"):
        runner.make_job("quick", "echokv-heads", "0.5", artifacts=[tiny_artifact, tiny_artifact])
