"""``echokv eval``: run methods side by side on one suite and write the results.

:func:`run_eval` is the whole evaluation as a function (``echokv eval`` runs its steps one by one).
Both go through two steps so that every mistake is reported before any model work:

1. :func:`make_job` checks what needs no model: suite, tasks, context lengths, sample count,
   method names (:func:`echokv_lab.methods.parse_methods` lists the known ones), compression ratios in
   [0, 1), artifact folders (well-formed), the LongBench folder (read and validated) and the output
   folder (exists without ``overwrite``).
2. :func:`execute` checks what needs the model: context lengths against its context (the ``ruler``
   suite's default lengths are clipped instead), artifacts made for another model
   (:func:`echokv.artifact.check_compatible`); then builds the inputs once (RULER samples with the
   evaluation split's prose as haystack, LongBench samples, perplexity blocks), shared by every
   method, and runs the methods.

Methods: ``full`` runs once (compression ratio 0); every other method runs at every ratio. All
methods share one :class:`~echokv.stats.collect.Calibration` (:data:`~echokv.config.CALIBRATION_TOKENS`
tokens of the calibration split; statistics shared through ``calibration.cache``). A method whose construction,
``prepare`` or run raises (:class:`~echokv_lab.methods.MethodUnavailable` or any other error)
gets rows with an ``error`` message and the other methods still run.

Each sample is answered with :meth:`Method.generate` (context prefilled and compressed, then the
question and answer decoded through the compressed cache) and scored with
:func:`echokv_lab.eval.metrics.score`. One row per (method, ratio, task, context length[, depth]):
``method``, ``compression_ratio``, ``kept_fraction`` and ``cache_bytes`` (measured: means of the
cache's memory report over the samples), ``task``, ``context_length``, ``depth``, ``score`` (mean in
[0, 1]), ``n``, ``seconds``, and ``method_info`` (the method's :meth:`~echokv_lab.methods.Method.info`: its kept
fraction, parameter bytes and parameters); perplexity rows are described in :mod:`echokv_lab.eval.perplexity`.
:func:`echokv_lab.eval.report.write_results` writes ``results.json``, ``report.md`` and the figures; the
runner adds a perplexity table to the report and ``predictions.jsonl`` (every answer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from echokv import distributed
from echokv.config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
from echokv_lab.eval import suites
from echokv_lab.eval.suites import FIDELITY, PERPLEXITY, ResolvedSuite

log = logging.getLogger(__name__)

FULL = "full"
KVPRESS = "kvpress:"
JOB_FILE = "job.json"
PEERS_ENV = "ECHOKV_PEERS_PYTHON"
PEERS_HINT = "run `bash scripts/setup.sh peers` (kvpress needs transformers 5.2.x in .venv-peers)"
#: rows that are not task scores: reported in their own tables
OTHER_TASKS = (PERPLEXITY, FIDELITY)
# Chat-template end-of-turn tokens that stop an answer like EOS does (used when the template has them).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
GENERATED_FILES = ("results.json", "report.md", "predictions.jsonl", JOB_FILE)


@dataclass
class EvalJob:
    """A validated evaluation: the resolved suite, the (method, ratio) runs and where to write.

    ``skipped`` maps a (method, ratio) that will not run to the reason (no artifact for the ratio without
    ``train_missing``, an artifact of another variant for a method that ``all`` brought in); ``remote`` lists the
    methods run in the peers environment (kvpress from the main environment)."""

    suite: ResolvedSuite
    runs: list[tuple[str, float]]
    artifacts: list[str]
    artifact_configs: dict[str, dict]
    data: str | None
    seed: int
    out: Path | None
    overwrite: bool
    notes: list[str] = field(default_factory=list)
    split: str = "test"
    text: list[str] | None = None
    resume: bool = False
    train_missing: bool = False
    skipped: dict[tuple[str, float], str] = field(default_factory=dict)
    remote: list[str] = field(default_factory=list)
    peers: str = "auto"
    model_name: str | None = None
    dtype: str | None = None
    inputs_file: str | None = None

    def description(self) -> dict:
        """What makes two runs comparable cell by cell (``--resume`` refuses another one): every setting that
        changes a row, the model and its dtype, the artifacts (by their weights' checksums, wherever they lie)
        and the prompts file included."""
        from echokv.artifact import sha256_file, weights_checksum

        s = self.suite
        return {"suite": s.name, "tasks": list(s.tasks), "context_lengths": list(s.context_lengths),
                "samples": s.samples, "seed": self.seed, "split": self.split,
                "text": [str(t) for t in self.text] if self.text else None,
                "perplexity": None if s.perplexity is None else list(dataclasses.astuple(s.perplexity)),
                "fidelity": None if s.fidelity is None else list(dataclasses.astuple(s.fidelity)),
                "model": self.model_name, "dtype": self.dtype, "data": self.data,
                "artifacts": sorted(weights_checksum(a, self.artifact_configs.get(a)) for a in self.artifacts),
                "inputs": None if self.inputs_file is None else sha256_file(self.inputs_file)}


# -- step 1: checks without the model -------------------------------------------------------------


def parse_ratios(ratios: str | float | Sequence[float] | None) -> list[float]:
    """``"0.5,0.7"`` (or a number or list) -> ratios, each in [0, 1) (fraction of the cache removed)."""
    from echokv.selection import check_ratio
    from echokv.util import parse_csv

    values = parse_csv(ratios, float, "compression ratio", "--compression-ratios 0.5,0.7") or []
    return list(dict.fromkeys(check_ratio(v) for v in values))


def _method_names(methods: str | Sequence[str]) -> tuple[list[str], bool]:
    """(names, whether the user said ``all``)."""
    from echokv_lab.methods import parse_methods

    spec = methods if isinstance(methods, str) else ",".join(str(m) for m in methods)
    is_all = [m.strip() for m in spec.split(",") if m.strip()] == ["all"]
    names = list(dict.fromkeys(parse_methods(spec)))
    if is_all:  # kvpress's presses run in the peers environment when this one lacks kvpress
        from echokv_lab.methods import known_methods

        names += [m for m in known_methods() if m.startswith(KVPRESS) and m not in names]
    return names, is_all


def _artifact_plan(job: EvalJob, names: list[str], ratios: list[float], explicit: bool) -> None:
    """Which EchoKV runs have their artifact, which are skipped (and why), which train on the fly.

    An artifact of the ratio but of another variant is the user's mistake when they named the method (a
    ``ValueError``, before any work); with ``all`` that method is skipped. No artifact for the ratio: skipped
    with a message naming the artifacts and their ratios, unless ``train_missing``."""
    from echokv import artifact as art
    from echokv_lab.methods.echokv import NAMES, wrong_variant

    described = [f"{Path(a).name} ({art.config_variant(c)}, ratio {art.config_ratio(c):g})"
                 for a, c in job.artifact_configs.items()]
    have = ", ".join(described) if described else "none was passed (--artifacts)"
    for name in names:
        if name not in NAMES:
            continue
        variant = NAMES[name][0]
        for r in ratios:
            same = [a for a, c in job.artifact_configs.items() if abs(art.config_ratio(c) - r) < 1e-9]
            match = [a for a in same if art.config_variant(job.artifact_configs[a]) == variant]
            if match:
                continue
            if same:
                message = wrong_variant(name, r, same[0], art.config_variant(job.artifact_configs[same[0]]), variant)
                if explicit:
                    raise ValueError(message)
                job.skipped[(name, r)] = f"skipped: {message}"
            elif job.train_missing:
                job.notes.append(f"{name}: no artifact for compression ratio {r:g} (artifacts: {have}); one is "
                                 "trained on the fly (--train-missing; minutes; kept in runs/ for later runs)")
            else:
                job.skipped[(name, r)] = (f"skipped: no {variant} artifact for ratio {r:g} (artifacts: {have}); "
                                          f"train one (`echokv train --compression-ratio {r:g} --variant {variant}`) and pass "
                                          "it with --artifacts, or pass --train-missing")


def make_job(suite: str, methods, ratios, artifacts=None, data=None, tasks=None, context_lengths=None,
             samples: int | None = None, seed: int = 0, out=None, overwrite: bool = False, *, split: str = "test",
             text=None, resume: bool = False, train_missing: bool = False, peers: str = "auto",
             model_name: str | None = None, dtype: str | None = None, inputs_file: str | None = None) -> EvalJob:
    """Validate everything that needs no model and return the job; raises ``ValueError`` and friends.

    Raises ``ValueError`` (unknown suite, task or method, bad ratio, length or sample count, malformed
    LongBench file, an artifact of another variant for a method the user named), ``FileNotFoundError``
    (LongBench folder, ``--text``), :class:`echokv.artifact.ArtifactError` (artifact folder) or
    ``FileExistsError`` (``out`` exists and neither ``overwrite`` nor ``resume``).
    """
    from echokv.artifact import read_config
    from echokv.data import HAYSTACK_SPLITS
    from echokv.util import check_output_dir

    resolved = suites.resolve(suite, tasks, context_lengths, samples)
    if train_missing and distributed.active():
        raise ValueError("--train-missing does not run under torchrun (every rank would train): train the artifact "
                         "first (`torchrun ... -m echokv train`) and pass it with --artifacts")
    if split not in HAYSTACK_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(HAYSTACK_SPLITS)}")
    names, is_all = _method_names(methods)
    ratio_list = parse_ratios(ratios)
    compressed = [m for m in names if m != FULL]
    if compressed and not ratio_list:
        raise ValueError(f"method(s) {', '.join(compressed)} need --compression-ratios (e.g. 0.5)")
    runs = ([(FULL, 0.0)] if FULL in names else []) + [(m, r) for m in compressed for r in ratio_list]

    artifacts = [str(a) for a in artifacts or []]
    configs = {a: read_config(a) for a in artifacts}
    _refuse_duplicate_artifacts(artifacts, configs)
    job = EvalJob(resolved, runs, artifacts, configs, None if data is None else str(data), seed,
                  None if out is None else Path(out), overwrite, split=split,
                  text=None if text is None else [str(t) for t in ([text] if isinstance(text, (str, Path)) else text)],
                  resume=resume, train_missing=train_missing, peers=peers, model_name=model_name, dtype=dtype,
                  inputs_file=None if inputs_file is None else str(inputs_file))
    _artifact_plan(job, names, ratio_list, explicit=not is_all)
    if job.text is not None:
        from echokv.data import load_text

        load_text("evaluation", job.text)  # reads and checks the files now
    from echokv_lab.methods.kvpress import kvpress_available

    kvpress_names = [m for m in names if m.startswith(KVPRESS)]
    if kvpress_names and not kvpress_available():
        job.remote = kvpress_names
        if peers == "off":
            for m in kvpress_names:
                for r in ratio_list:
                    job.skipped[(m, r)] = f"unavailable: kvpress is not installed here (--peers off); {PEERS_HINT}"
        elif resolved.source in ("ruler", "longbench") and peers_python() is None:
            for m in kvpress_names:
                for r in ratio_list:
                    job.skipped[(m, r)] = f"unavailable: {PEERS_HINT}"
    if resolved.source == "longbench":
        if data is None:
            from echokv_lab.eval.longbench import DOWNLOAD_HINT

            raise ValueError(f"the longbench suite needs --data FOLDER: {DOWNLOAD_HINT}")
        from echokv_lab.eval.longbench import load_longbench

        load_longbench(data, resolved.tasks, limit=resolved.samples)  # reads and validates every file now
    elif data is not None:
        job.notes.append(f"--data is only used by the longbench suite; ignored for {resolved.name}")
    if job.out is not None:
        if resume:
            _check_resume(job)
        else:
            check_output_dir(job.out, overwrite)
    return job


def _refuse_duplicate_artifacts(artifacts: list[str], configs: dict) -> None:
    """Two artifacts of one variant and ratio: only the first would run, silently."""
    from echokv import artifact as art

    seen: dict[tuple, str] = {}
    for a in artifacts:
        c = configs[a]
        kind = (art.config_variant(c), round(art.config_ratio(c), 9))
        if kind in seen and Path(seen[kind]).resolve() == Path(a).resolve():
            raise ValueError(f"--artifacts: {a} is passed twice; pass each artifact once")
        if kind in seen:
            raise ValueError(f"--artifacts: {seen[kind]} and {a} are both {kind[0]} artifacts for compression ratio "
                             f"{kind[1]:g}, and only one would run: pass one artifact per ratio and variant")
        seen[kind] = a


def _check_resume(job: EvalJob) -> None:
    """``--resume``: the folder, if it exists, must hold a run of the same suite, samples and seed."""
    path = job.out / JOB_FILE
    if not job.out.exists():
        return
    if not job.out.is_dir():
        raise FileExistsError(f"output path {job.out} exists and is not a folder")
    if not path.is_file():
        if (job.out / "results.json").is_file():
            raise ValueError(f"--resume: {job.out} holds results of an older run without {JOB_FILE}; "
                             "rerun without --resume (and with --overwrite) or choose another --out")
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    mine = job.description()
    differ = [_difference(k, saved, mine[k]) for k in mine if saved.get(k) != mine[k]]
    if differ:
        raise ValueError(f"--resume: the results in {job.out} are of another run ({'; '.join(differ)}): its rows "
                         "and this run's would mix in one table; use the same options or another --out")


def _difference(key: str, saved: dict, mine) -> str:
    """One setting that differs between the run in ``--out`` and this one, in words."""
    if key not in saved:
        return f"{key}: not recorded by that run (an older echokv)"
    if key == "artifacts":
        return "artifacts: their weights differ (checksums)"
    short = lambda v: isinstance(v, (str, int, float, type(None))) and len(str(v)) <= 80
    if short(saved[key]) and short(mine):
        return f"{key}: {saved[key]} there, {mine} now"
    return f"{key} differs"


def previous_rows(job: EvalJob) -> tuple[list[dict], list[dict]]:
    """``--resume``: the rows and predictions already in ``job.out`` (rows with an error are run again)."""
    if not (job.resume and job.out is not None and (job.out / "results.json").is_file()):
        return [], []
    rows = [r for r in json.loads((job.out / "results.json").read_text(encoding="utf-8")) if not r.get("error")]
    predictions = []
    path = job.out / "predictions.jsonl"
    if path.is_file():
        predictions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    done = {_cell_key(r) for r in rows}
    predictions = [p for p in predictions if _cell_key(p) in done]
    return rows, predictions


def _cell_key(row: dict) -> tuple:
    depth = row.get("depth")
    return (row.get("method"), round(float(row.get("compression_ratio", 0.0)), 9), row.get("task"),
            int(row.get("context_length") or 0), None if depth is None else round(float(depth), 6))


# -- step 2: with the model ------------------------------------------------------------------------


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """EOS of the tokenizer and the model's generation config, plus the chat template's end-of-turn token."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                add(v)

    add(getattr(tokenizer, "eos_token_id", None))
    generation_config = getattr(model, "generation_config", None)
    add(getattr(generation_config, "eos_token_id", None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        for token in END_OF_TURN_TOKENS:
            if token in template and token in vocab:
                ids.add(int(vocab[token]))
    return ids


def check_with_model(job: EvalJob, model) -> None:
    """Checks that need the model, before any work: context lengths and artifact compatibility."""
    from echokv.artifact import check_compatible
    from echokv.models import kv_geometry

    job.suite.check_model(kv_geometry(model).max_context)
    for path, config in job.artifact_configs.items():
        check_compatible(config, model, path)


@dataclass
class Inputs:
    """What every method is evaluated on: sample cells and perplexity / fidelity blocks (built once)."""

    cells: list[tuple[dict, list]]  # (row keys: task, context_length, depth), samples
    ppl_blocks: object = None  # [N, T] token ids or None
    prompt_ids: dict = field(default_factory=dict)  # id(sample) -> (context_ids, question_ids)
    fidelity_blocks: object = None  # [N, T] token ids or None

    @property
    def n_samples(self) -> int:
        return sum(len(s) for _, s in self.cells)


def haystacks(job: EvalJob) -> list[tuple[str, str]]:
    """(name, text) of the NIAH haystack sources of the job's split (and its ``--text``)."""
    from echokv.data import haystack_sources

    return [(h["name"], h["text"]) for h in haystack_sources(job.split, job.text)]


def build_inputs(job: EvalJob, model, tokenizer, progress: bool = True) -> Inputs:
    """Generate (RULER) or load (LongBench, or the parent's ``--inputs`` file) the samples and cut the
    perplexity / fidelity blocks, once."""
    from tqdm.auto import tqdm

    from echokv.models import kv_geometry
    from echokv_lab.eval.sample import prompt_ids

    if job.inputs_file is not None:
        return read_inputs(job.inputs_file)
    suite = job.suite
    samples = []
    if suite.source == "ruler" and suite.tasks:
        from echokv_lab.eval.ruler import PHRASINGS, generate

        sources = haystacks(job)
        combos = [(t, j, c) for t in suite.tasks for j, c in enumerate(suite.context_lengths)]
        for task, j, length in tqdm(combos, desc="generating samples", disable=not progress, leave=False):
            depths = suite.depths if suites.uses_depths(task) else None
            samples += generate(task, tokenizer, length, suite.samples, seed=suites.length_seed(job.seed, j),
                                depths=depths, haystacks=sources, phrasings=PHRASINGS[job.split])
    elif suite.source == "longbench":
        from echokv_lab.eval.longbench import load_longbench

        cap = suite.longbench_max_prompt(kv_geometry(model).max_context)
        samples = load_longbench(job.data, suite.tasks, tokenizer, max_prompt_tokens=cap, limit=suite.samples)
    if suite.max_new_tokens:
        for s in samples:
            s.max_new_tokens = min(s.max_new_tokens, suite.max_new_tokens)

    groups: dict[tuple, list] = {}
    for s in samples:
        length = s.context_length if suite.source == "ruler" else None
        groups.setdefault((s.task, length, s.depth), []).append(s)
    cells = []
    for (task, length, depth), group in groups.items():
        if length is None:  # LongBench: the mean prompt length of the task's samples
            length = round(sum(s.context_length for s in group) / len(group))
        cells.append(({"task": task, "context_length": int(length), "depth": depth}, group))
    ids = {id(s): prompt_ids(tokenizer, s) for s in samples}

    from echokv_lab.eval.perplexity import heldout_blocks

    blocks = heldout_blocks(tokenizer, suite.perplexity) if suite.perplexity is not None else None
    fidelity = heldout_blocks(tokenizer, suite.fidelity) if suite.fidelity is not None else None
    return Inputs(cells, blocks, ids, fidelity)


def write_inputs(inputs: Inputs, path: Path) -> None:
    """The samples as token ids (what the peers run answers: the very same prompts), JSON."""
    from dataclasses import asdict

    cells = []
    for keys, samples in inputs.cells:
        cells.append({"keys": keys, "samples": [
            {"sample": {k: v for k, v in asdict(s).items() if k not in ("context",)},
             "ids": list(inputs.prompt_ids[id(s)])} for s in samples]})
    Path(path).write_text(json.dumps({"format": "echokv-eval-inputs-1", "cells": cells}), encoding="utf-8")


def read_inputs(path) -> Inputs:
    from echokv_lab.eval.sample import Sample

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != "echokv-eval-inputs-1":
        raise ValueError(f"{path} is not an inputs file written by echokv eval")
    cells, ids = [], {}
    for cell in data["cells"]:
        samples = []
        for item in cell["samples"]:
            sample = Sample(context="", **item["sample"])
            ids[id(sample)] = tuple(item["ids"])
            samples.append(sample)
        cells.append((cell["keys"], samples))
    return Inputs(cells, None, ids, None)


def _error_rows(base: dict, inputs: Inputs, message: str, field_name: str = "error") -> list[dict]:
    rows = [{**base, **keys, "n": 0, field_name: message} for keys, _ in inputs.cells]
    for task, blocks in ((PERPLEXITY, inputs.ppl_blocks), (FIDELITY, inputs.fidelity_blocks)):
        if blocks is not None:
            rows.append({**base, "task": task, "context_length": int(blocks.shape[1]), "n": 0, field_name: message})
    return rows


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


#: a method whose kept fraction (after ``prepare``) is further than this from ``1 - ratio`` cannot reach the ratio
REACH_TOLERANCE = 0.07


def unreachable(method, ratio: float) -> str | None:
    """Why ``method`` (prepared) cannot reach ``ratio``, or None. Methods that know their kept fraction before a
    run (``achieved_kept_fraction``) must be within :data:`REACH_TOLERANCE` of ``1 - ratio``."""
    try:
        kept = method.achieved_kept_fraction
    except Exception:  # noqa: BLE001 - methods that only measure it in a run
        return None
    if kept is None or ratio == 0:
        return None
    if abs(kept - (1.0 - ratio)) > REACH_TOLERANCE:
        return (f"cannot reach ratio {ratio:g}: its nearest setting keeps {kept:.3f} of the cache "
                f"(asked {1 - ratio:.3f}, tolerance {REACH_TOLERANCE})")
    return None


def run_method(name: str, ratio: float, model, tokenizer, job: EvalJob, inputs: Inputs, calibration,
               eos_ids: set[int], progress: bool = True, predictions: list | None = None,
               done: set | None = None) -> list[dict]:
    """Rows of one (method, ratio) over every cell, and its perplexity / fidelity rows; failures become error
    rows, a method that cannot run here or cannot reach the ratio ``skipped`` rows. Cells in ``done``
    (``--resume``) are not run again."""
    from tqdm.auto import tqdm

    from echokv_lab.eval.intervals import with_interval
    from echokv_lab.eval.metrics import score
    from echokv_lab.methods import MethodUnavailable, make_method

    suite = job.suite
    base = {"method": name, "compression_ratio": float(ratio)}
    label = name if name == FULL else f"{name}@{ratio:g}"
    done = done or set()
    todo = [(keys, samples) for keys, samples in inputs.cells if _cell_key({**base, **keys}) not in done]
    extra = [(task, blocks) for task, blocks in ((PERPLEXITY, inputs.ppl_blocks), (FIDELITY, inputs.fidelity_blocks))
             if blocks is not None and _cell_key({**base, "task": task, "context_length": int(blocks.shape[1])})
             not in done]
    if not todo and not extra:
        return []
    remaining = Inputs(todo, dict(extra).get(PERPLEXITY), inputs.prompt_ids, dict(extra).get(FIDELITY))
    if (name, ratio) in job.skipped:
        log.warning("[echokv eval] %s %s", label, job.skipped[(name, ratio)])
        return _error_rows(base, remaining, job.skipped[(name, ratio)], "skipped")
    try:
        method = make_method(name, ratio, job.artifacts)
        if getattr(method, "artifact", "set") is None and hasattr(method, "work_dir") and not job.train_missing:
            raise MethodUnavailable(f"no artifact for ratio {ratio:g}; pass --train-missing to train one")
        start = time.perf_counter()
        method.prepare(model, tokenizer, calibration)
        prepare_seconds = time.perf_counter() - start
        info = method.info()
        why = unreachable(method, ratio)
        if why:
            raise MethodUnavailable(why)
    except (KeyboardInterrupt, SystemExit):
        raise
    except MethodUnavailable as exc:
        log.warning("[echokv eval] %s skipped: %s", label, exc)
        return _error_rows(base, remaining, f"skipped: {exc}", "skipped")
    except Exception as exc:  # noqa: BLE001 - any failure of one method must not stop the others
        _report_failure(label, "prepare", exc)
        return _error_rows(base, remaining, _message(exc))

    rows: list[dict] = []
    unavailable: str | None = None
    bar = tqdm(total=remaining.n_samples, desc=label, disable=not progress or not remaining.n_samples,
               unit="sample")
    for keys, samples in todo:
        if unavailable:
            rows.append({**base, **keys, "n": 0, "skipped": unavailable})
            bar.update(len(samples))
            continue
        bar.set_postfix_str(f"{keys['task']} @ {keys['context_length']}")
        scores, kept, cache_bytes, full_bytes, new_tokens, prompt_tokens = [], [], [], [], [], []
        start = time.perf_counter()
        try:
            for sample in samples:
                context_ids, question_ids = inputs.prompt_ids[id(sample)]
                t0 = time.perf_counter()
                new_ids, report = method.generate(model, list(context_ids), list(question_ids),
                                                  sample.max_new_tokens, eos_ids)
                sample_seconds = time.perf_counter() - t0
                prediction = tokenizer.decode(new_ids, skip_special_tokens=True)
                value = score(sample, prediction)
                scores.append(value)
                kept.append(float(report["kept_fraction"]))
                cache_bytes.append(float(report["cache_bytes"]))
                full_bytes.append(float(report["full_cache_bytes"]))
                new_tokens.append(len(new_ids))
                prompt_tokens.append(len(context_ids) + len(question_ids))
                if predictions is not None:
                    predictions.append({**base, **keys, "index": sample.metadata.get("index", sample.metadata.get("_id")),
                                        "haystack": sample.metadata.get("haystack"),
                                        "phrasing": sample.metadata.get("phrasing"),
                                        "prediction": prediction, "answers": sample.answers, "score": value,
                                        "seconds": sample_seconds})
                bar.update(1)
        except (KeyboardInterrupt, SystemExit):
            bar.close()
            raise
        except MethodUnavailable as exc:
            unavailable = f"skipped: {exc}"
            log.warning("[echokv eval] %s skipped (%s @ %s): %s", label, keys["task"], keys["context_length"], exc)
            rows.append({**base, **keys, "n": 0, "skipped": unavailable})
            bar.update(len(samples) - len(scores))
            continue
        except Exception as exc:  # noqa: BLE001
            _report_failure(label, f"{keys['task']} @ {keys['context_length']}", exc)
            rows.append({**base, **keys, "n": 0, "error": _message(exc)})
            bar.update(len(samples) - len(scores))
            continue
        seconds = time.perf_counter() - start
        n = len(scores)
        rows.append(with_interval({
            **base, **keys,
            "score": sum(scores) / n,
            "n": n,
            "kept_fraction": sum(kept) / n,
            "cache_bytes": sum(cache_bytes) / n,
            "full_cache_bytes": sum(full_bytes) / n,
            "prompt_tokens": sum(prompt_tokens) / n,
            "new_tokens": sum(new_tokens) / n,
            "seconds": seconds,
            "prepare_seconds": prepare_seconds,
            "method_info": info,
        }))
    bar.close()

    for task, blocks in extra:
        try:
            if unavailable:
                raise MethodUnavailable(unavailable.removeprefix("skipped: "))
            if task == PERPLEXITY:
                from echokv_lab.eval.perplexity import perplexity_row

                measured = perplexity_row(model, method, blocks, suite.perplexity.chunk, progress,
                                          desc=f"{label} perplexity")
            else:
                from echokv_lab.eval.fidelity import fidelity_row

                measured = fidelity_row(model, method, blocks, suite.fidelity.chunk, progress,
                                        desc=f"{label} fidelity")
            row = {**base, **measured, "prepare_seconds": prepare_seconds, "method_info": info}
        except (KeyboardInterrupt, SystemExit):
            raise
        except MethodUnavailable as exc:
            log.warning("[echokv eval] %s skipped (%s): %s", label, task, exc)
            row = {**base, "task": task, "context_length": int(blocks.shape[1]), "n": 0,
                   "skipped": f"skipped: {str(exc).removeprefix('skipped: ')}"}
        except Exception as exc:  # noqa: BLE001
            _report_failure(label, task, exc)
            row = {**base, "task": task, "context_length": int(blocks.shape[1]), "n": 0, "error": _message(exc)}
        rows.append(row)
    return rows


def _report_failure(label: str, where: str, exc: BaseException) -> None:
    """Log that a method failed, in one line; the end of its traceback only at debug level."""
    log.error("[echokv eval] %s failed (%s): %s", label, where, _message(exc))
    log.debug("%s", "".join(traceback.format_exception(exc, limit=-3)).rstrip())


# -- the peers environment (kvpress from the main environment) ------------------------------------------


def peers_python() -> str | None:
    """The Python of the peers environment: ``$ECHOKV_PEERS_PYTHON``, else ``.venv-peers`` next to the running
    environment or in the repository holding this echokv; None when there is none."""
    env = os.environ.get(PEERS_ENV)
    if env:
        return env if Path(env).is_file() else None
    here = Path(__file__).resolve()
    candidates = [Path(sys.prefix).parent / ".venv-peers", here.parents[3] / ".venv-peers"]
    for venv in candidates:
        python = venv / "bin" / "python"
        if python.is_file() and venv.resolve() != Path(sys.prefix).resolve():
            return str(python)
    return None


def run_peers(job: EvalJob, inputs: Inputs, runs: list[tuple[str, float]], progress: bool = True) -> list[dict]:
    """Run ``runs`` (kvpress presses) in the peers environment on the very same prompts (token ids written to a
    file) and return their rows, marked ``environment: peers``; a missing environment or a failed run gives
    ``skipped`` / ``error`` rows that say so."""
    if not runs:
        return []
    python = peers_python()
    if python is None:
        return [r for m, ratio in runs for r in _error_rows({"method": m, "compression_ratio": ratio},
                                                           _cells_only(inputs), f"unavailable: {PEERS_HINT}",
                                                           "skipped")]
    if not job.model_name:
        message = ("unavailable: the peers run loads the model by name, and this model has none (load it with "
                   "echokv.load_model or run from the command line)")
        return [r for m, ratio in runs for r in _error_rows({"method": m, "compression_ratio": ratio},
                                                           _cells_only(inputs), message, "skipped")]
    with tempfile.TemporaryDirectory(prefix="echokv-peers-") as tmp:
        tmp = Path(tmp)
        write_inputs(_cells_only(inputs), tmp / "inputs.json")
        names = ",".join(dict.fromkeys(m for m, _ in runs))
        ratios = ",".join(dict.fromkeys(f"{r:g}" for _, r in runs))
        cmd = [python, "-m", "echokv", "eval", "--suite", job.suite.name, "--methods", names,
               "--compression-ratios", ratios, "--inputs", str(tmp / "inputs.json"), "--model", job.model_name,
               "--out", str(tmp / "out"), "--peers", "off"]
        if job.dtype:
            cmd += ["--dtype", job.dtype]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # this echokv's source, first on the path
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop(PEERS_ENV, None)
        for name in distributed.TORCHRUN_ENV:  # the child is one process, not a rank
            env.pop(name, None)
        log.info("[echokv eval] running %s in the peers environment (%s)", names, python)
        proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              text=True)
        results = tmp / "out" / "results.json"
        if not results.is_file():
            tail = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-3:]
            message = f"the peers run failed (exit {proc.returncode}): {' / '.join(tail) or 'no output'}"
            return [r for m, ratio in runs for r in _error_rows({"method": m, "compression_ratio": ratio},
                                                               _cells_only(inputs), message)]
        rows = json.loads(results.read_text(encoding="utf-8"))
    wanted = set(runs)
    out = [{**r, "environment": "peers"} for r in rows
           if (r.get("method"), float(r.get("compression_ratio", 0.0))) in wanted and r.get("task") not in OTHER_TASKS]
    for m, ratio in runs:  # kvpress has no streaming perplexity / fidelity protocol
        for task, blocks in ((PERPLEXITY, inputs.ppl_blocks), (FIDELITY, inputs.fidelity_blocks)):
            if blocks is not None:
                out.append({"method": m, "compression_ratio": ratio, "task": task,
                            "context_length": int(blocks.shape[1]), "n": 0, "environment": "peers",
                            "skipped": "skipped: kvpress compresses only a one-shot prefill: no streaming "
                                       f"{task} protocol"})
    return out


def _cells_only(inputs: Inputs) -> Inputs:
    return Inputs(inputs.cells, inputs.ppl_blocks, inputs.prompt_ids, inputs.fidelity_blocks)


def execute(job: EvalJob, model, tokenizer, progress: bool = True) -> list[dict]:
    """Check against the model, build the inputs once, run every (method, ratio), write the results."""
    from echokv.data import token_blocks
    from echokv.stats.collect import Calibration

    check_with_model(job, model)
    if job.model_name is None:
        job.model_name = getattr(model, "echokv_name", None)
    if job.dtype is None:
        job.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for note in job.notes + job.suite.notes:
        log.warning("[echokv eval] %s", note)
    rows, predictions = previous_rows(job)
    done = {_cell_key(r) for r in rows}
    if done:
        log.warning("[echokv eval] --resume: %d result rows already in %s are kept", len(rows), job.out)
    inputs = build_inputs(job, model, tokenizer, progress)
    local = [(n, r) for n, r in job.runs if n not in job.remote]
    remote = [(n, r) for n, r in job.runs if n in job.remote and (n, r) not in job.skipped]
    calibration = None
    if any(name != FULL and (name, r) not in job.skipped for name, r in local):
        calibration = Calibration(token_blocks(tokenizer, "calibration", CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN))
    eos_ids = eos_token_ids(tokenizer, model)
    in_order = local + [(n, r) for n, r in job.runs if n in job.remote and (n, r) in job.skipped]
    others = _other_ranks_cells(in_order, inputs)
    main = distributed.is_main()
    for name, ratio in in_order:
        mine = [] if distributed.active() else predictions
        new = run_method(name, ratio, model, tokenizer, job, inputs, calibration, eos_ids, progress, mine,
                         done | others)
        if distributed.active():
            new, mine = _merge_ranks(new, mine, inputs)
            predictions += mine
        rows += new
        if job.out is not None and main:  # after every method: a long run that is stopped keeps what it measured
            write(rows, predictions, job)
    remote = [(n, r) for n, r in remote if any(_cell_key({"method": n, "compression_ratio": r, **k}) not in done
                                                 for k, _ in inputs.cells)]
    if remote:
        new = run_peers(job, inputs, remote, progress) if main else []
        rows += distributed.gather_json(new)[0]  # rank 0's (the peers environment runs once)
        if job.out is not None and main:
            write(rows, predictions, job)
    return rows


# -- data parallel (torchrun: echokv.distributed) --------------------------------------------------------------
def _units(inputs: Inputs) -> list[dict]:
    """The row keys of one (method, ratio): its sample cells, then perplexity and fidelity, in row order."""
    extra = [{"task": task, "context_length": int(blocks.shape[1]), "depth": None}
             for task, blocks in ((PERPLEXITY, inputs.ppl_blocks), (FIDELITY, inputs.fidelity_blocks))
             if blocks is not None]
    return [keys for keys, _ in inputs.cells] + extra


def _other_ranks_cells(runs: list[tuple[str, float]], inputs: Inputs) -> set:
    """The cells (one result row each: method, ratio, task, context length, depth) the other ranks run: every
    ``size()``-th cell of the whole evaluation is this rank's (nothing in one process)."""
    if not distributed.active():
        return set()
    cells = [_cell_key({"method": n, "compression_ratio": float(r), **keys}) for n, r in runs for keys in _units(inputs)]
    return {c for i, c in enumerate(cells) if i % distributed.size() != distributed.rank()}


def _merge_ranks(rows: list[dict], predictions: list[dict], inputs: Inputs) -> tuple[list[dict], list[dict]]:
    """Every rank's rows and predictions of one (method, ratio), in the order one process writes them (a cell's
    rows and predictions come whole from one rank)."""
    order = {_cell_key({"method": None, "compression_ratio": 0.0, **keys})[2:]: i
             for i, keys in enumerate(_units(inputs))}
    parts = distributed.gather_json([rows, predictions])

    def sort(items):
        return sorted(items, key=lambda item: order.get(_cell_key(item)[2:], len(order)))

    return sort([r for part in parts for r in part[0]]), sort([p for part in parts for p in part[1]])


def write(rows: list[dict], predictions: list[dict], job: EvalJob) -> dict[str, Path]:
    """``results.json`` (every row), ``report.md``, figures, ``predictions.jsonl`` and ``job.json`` in ``job.out``.

    Task rows go through :func:`echokv_lab.eval.report.write_results`; perplexity and fidelity rows, which are not
    scores of a task, get their own tables and figures appended to the report. Each file appears complete
    (:func:`~echokv.util.atomic_dir`); other files in ``job.out`` stay.
    """
    from echokv.util import atomic_dir

    out = job.out
    if out.is_dir() and job.overwrite and not job.resume:  # files of an earlier run this one might not rewrite
        for path in list(out.glob("*.png")) + [out / f for f in GENERATED_FILES]:
            if path.is_file():
                path.unlink()
    with atomic_dir(out, overwrite=True, replace=False) as tmp:  # (make_job checked the folder)
        written = _write_files(rows, predictions, job, tmp)
    return {key: out / path.name for key, path in written.items()}


def _write_files(rows: list[dict], predictions: list[dict], job: EvalJob, out: Path) -> dict[str, Path]:
    from echokv_lab.eval.perplexity import perplexity_table, plot_perplexity
    from echokv_lab.eval.report import write_results

    task_rows = [r for r in rows if r.get("task") not in OTHER_TASKS]
    written = write_results(task_rows, out, job.suite.name)
    written["results"].write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    text = written["report"].read_text(encoding="utf-8").rstrip("\n")
    if not task_rows:
        text = text.rstrip() + "\n"  # the ppl / fidelity suites: no task table above
    ppl = perplexity_table(rows)
    if ppl:
        text += ("\n\n## Perplexity\n\nHeld-out perplexity of the evaluation split "
                 f"({_ppl_tokens(rows)} predicted tokens per method), streamed through each method's cache in "
                 f"chunks of {job.suite.perplexity.chunk} tokens (lower is better); the interval is a 95% "
                 "bootstrap over the sequences (few sequences: coarse).\n\n" + "\n".join(ppl) + "\n")
        png = plot_perplexity(rows, out / f"{job.suite.name}_perplexity_vs_kept.png")
        if png is not None:
            written["perplexity_plot"] = png
            text += f"\n![perplexity vs kept KV fraction]({png.name})\n"
    if any(r.get("task") == FIDELITY for r in rows):
        from echokv_lab.eval.fidelity import fidelity_section

        section, pngs = fidelity_section(rows, out)
        text += "\n\n" + section
        written.update({f"fidelity:{p.stem}": p for p in pngs})
    written["report"].write_text(text, encoding="utf-8")
    path = out / "predictions.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    written["predictions"] = path
    (out / JOB_FILE).write_text(json.dumps(job.description(), indent=2) + "\n", encoding="utf-8")
    written["job"] = out / JOB_FILE
    return written


def _ppl_tokens(rows: list[dict]) -> int:
    """Predicted tokens behind a perplexity row (the same for every method)."""
    return max((int(r.get("tokens", 0)) for r in rows if r.get("task") == PERPLEXITY), default=0)


def run_eval(model, tokenizer, suite: str, methods, ratios, artifacts=None, data=None, tasks=None,
             context_lengths=None, samples: int | None = None, seed: int = 0, out=None, progress: bool = True,
             overwrite: bool = False, **options) -> list[dict]:
    """Evaluate ``methods`` (at every ratio of ``ratios``; ``full`` once) on ``suite`` and return the rows.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer.
        suite: ``quick``, ``ruler``, ``longbench``, ``ppl``, ``long`` or ``fidelity`` (:mod:`echokv_lab.eval.suites`).
        methods: method names (list or comma-separated string; ``"all"``: every available method).
        ratios: compression ratios in [0, 1) (list or comma-separated string).
        artifacts: EchoKV artifact folders, matched to the ratios by their training ratio.
        data: LongBench folder (``longbench`` suite only).
        tasks, context_lengths, samples: overrides of the suite's defaults.
        seed: seed of the RULER samples.
        out: folder for ``results.json``, ``report.md``, figures and ``predictions.jsonl`` (None: no files).
        progress: tqdm progress bars.
        overwrite: allow ``out`` to exist.
        options: ``split``, ``text``, ``resume``, ``train_missing``, ``peers`` (see :func:`make_job`).

    Every check runs before any model work (:func:`make_job`, :func:`check_with_model`).
    """
    # the model a library caller passes is the run's model (the command line names it before it loads)
    options.setdefault("model_name", getattr(model, "echokv_name", None))
    options.setdefault("dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    job = make_job(suite, methods, ratios, artifacts, data, tasks, context_lengths, samples, seed, out, overwrite,
                   **options)
    return execute(job, model, tokenizer, progress)


# -- summary -------------------------------------------------------------------------------------------


def summary_lines(rows: list[dict]) -> list[str]:
    """A plain-text table: mean score x100 per task for each method and ratio (perplexity as is)."""
    from collections import defaultdict

    tasks = list(dict.fromkeys(r["task"] for r in rows if r.get("task")))
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        key = (r["method"] != FULL, r["method"], float(r.get("compression_ratio", 0.0)))
        cell = groups[key].setdefault(r.get("task"), {"sum": 0.0, "n": 0, "ppl": None, "error": None,
                                                     "kept": [], "seconds": 0.0})
        if r.get("error") or r.get("skipped"):
            cell["error"] = r.get("error") or r["skipped"]
            continue
        if r.get("task") == FIDELITY:
            cell["ppl"] = r["kl"]
            cell["fidelity"] = True
        elif r.get("task") == PERPLEXITY:
            cell["ppl"] = r["perplexity"]
        else:
            cell["sum"] += r["score"] * r["n"]
            cell["n"] += r["n"]
        cell["kept"].append(r["kept_fraction"])
        cell["seconds"] += r.get("seconds", 0.0)
    header = f"{'method':<16} {'ratio':>5} {'kept':>5} " + " ".join(f"{t[:16]:>16}" for t in tasks) + f" {'seconds':>8}"
    lines = [header]
    for key in sorted(groups):
        cells = groups[key]
        kept = [k for c in cells.values() for k in c["kept"]]
        kept_text = f"{sum(kept) / len(kept):.2f}" if kept else "-"
        values = []
        for t in tasks:
            c = cells.get(t)
            if c is None:
                values.append("-")
            elif c["error"] and not c["n"] and c["ppl"] is None:
                values.append("skipped" if str(c["error"]).startswith(("skipped", "unavailable")) else "error")
            elif t == FIDELITY:
                values.append(f"KL {c['ppl']:.4f}")
            elif t == PERPLEXITY:
                values.append(f"ppl {c['ppl']:.2f}")
            else:
                values.append(f"{100 * c['sum'] / c['n']:.1f}")
        seconds = sum(c["seconds"] for c in cells.values())
        lines.append(f"{key[1]:<16} {key[2]:>5g} {kept_text:>5} " + " ".join(f"{v:>16}" for v in values)
                     + f" {seconds:>8.1f}")
    return lines
