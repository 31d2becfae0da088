"""``echokv eval``: run methods side by side on one suite and write the results.

:func:`run_eval` is the whole evaluation as a function (``echokv eval`` runs its steps one by one).
Both go through two steps so that every mistake is reported before any model work:

1. :func:`make_job` checks what needs no model: suite, tasks, context lengths, sample count,
   method names (:func:`echokv.methods.parse_methods` lists the known ones), compression ratios in
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
``prepare`` or run raises (:class:`~echokv.methods.MethodUnavailable` or any other error)
gets rows with an ``error`` message and the other methods still run.

Each sample is answered with :meth:`Method.generate` (context prefilled and compressed, then the
question and answer decoded through the compressed cache) and scored with
:func:`echokv.eval.metrics.score`. One row per (method, ratio, task, context length[, depth]):
``method``, ``compression_ratio``, ``kept_fraction`` and ``cache_bytes`` (measured: means of the
cache's memory report over the samples), ``task``, ``context_length``, ``depth``, ``score`` (mean in
[0, 1]), ``n``, ``seconds``, and ``method_info`` (the method's :meth:`~echokv.methods.Method.info`: its kept
fraction, parameter bytes and parameters); perplexity rows are described in :mod:`echokv.eval.perplexity`.
:func:`echokv.eval.report.write_results` writes ``results.json``, ``report.md`` and the figures; the
runner adds a perplexity table to the report and ``predictions.jsonl`` (every answer).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from echokv.config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
from echokv.eval import suites
from echokv.eval.suites import PERPLEXITY, ResolvedSuite

log = logging.getLogger(__name__)

FULL = "full"
# Chat-template end-of-turn tokens that stop an answer like EOS does (used when the template has them).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
GENERATED_FILES = ("results.json", "report.md", "predictions.jsonl")


@dataclass
class EvalJob:
    """A validated evaluation: the resolved suite, the (method, ratio) runs and where to write."""

    suite: ResolvedSuite
    runs: list[tuple[str, float]]
    artifacts: list[str]
    artifact_configs: dict[str, dict]
    data: str | None
    seed: int
    out: Path | None
    overwrite: bool
    notes: list[str] = field(default_factory=list)


# -- step 1: checks without the model -------------------------------------------------------------


def parse_ratios(ratios: str | float | Sequence[float] | None) -> list[float]:
    """``"0.5,0.7"`` (or a number or list) -> ratios, each in [0, 1) (fraction of the cache removed)."""
    from echokv.selection import check_ratio
    from echokv.util import parse_csv

    values = parse_csv(ratios, float, "compression ratio", "--compression-ratios 0.5,0.7") or []
    return list(dict.fromkeys(check_ratio(v) for v in values))


def _method_names(methods: str | Sequence[str]) -> list[str]:
    from echokv.methods import parse_methods

    spec = methods if isinstance(methods, str) else ",".join(str(m) for m in methods)
    return list(dict.fromkeys(parse_methods(spec)))


def make_job(suite: str, methods, ratios, artifacts=None, data=None, tasks=None, context_lengths=None,
              samples: int | None = None, seed: int = 0, out=None, overwrite: bool = False) -> EvalJob:
    """Validate everything that needs no model and return the job; raises ``ValueError`` and friends.

    Raises ``ValueError`` (unknown suite, task or method, bad ratio, length or sample count, malformed
    LongBench file), ``FileNotFoundError`` (LongBench folder), :class:`echokv.artifact.ArtifactError`
    (artifact folder) or ``FileExistsError`` (``out`` exists and ``overwrite`` is false).
    """
    from echokv.artifact import read_config
    from echokv.methods.echokv import artifact_notes
    from echokv.util import check_output_dir

    resolved = suites.resolve(suite, tasks, context_lengths, samples)
    names = _method_names(methods)
    ratio_list = parse_ratios(ratios)
    compressed = [m for m in names if m != FULL]
    if compressed and not ratio_list:
        raise ValueError(f"method(s) {', '.join(compressed)} need --compression-ratios (e.g. 0.5)")
    runs = ([(FULL, 0.0)] if FULL in names else []) + [(m, r) for m in compressed for r in ratio_list]

    artifacts = [str(a) for a in artifacts or []]
    configs = {a: read_config(a) for a in artifacts}
    job = EvalJob(resolved, runs, artifacts, configs, None if data is None else str(data), seed,
                  None if out is None else Path(out), overwrite)
    for name in names:
        job.notes += artifact_notes(name, ratio_list, list(configs.values()))
    if resolved.source == "longbench":
        if data is None:
            from echokv.eval.longbench import DOWNLOAD_HINT

            raise ValueError(f"the longbench suite needs --data FOLDER: {DOWNLOAD_HINT}")
        from echokv.eval.longbench import load_longbench

        load_longbench(data, resolved.tasks, limit=resolved.samples)  # reads and validates every file now
    elif data is not None:
        job.notes.append(f"--data is only used by the longbench suite; ignored for {resolved.name}")
    if job.out is not None:
        check_output_dir(job.out, overwrite)
    return job


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
    """What every method is evaluated on: sample cells and perplexity blocks (built once)."""

    cells: list[tuple[dict, list]]  # (row keys: task, context_length, depth), samples
    ppl_blocks: object = None  # [N, T] token ids or None
    prompt_ids: dict = field(default_factory=dict)  # id(sample) -> (context_ids, question_ids)

    @property
    def n_samples(self) -> int:
        return sum(len(s) for _, s in self.cells)


def build_inputs(job: EvalJob, model, tokenizer, progress: bool = True) -> Inputs:
    """Generate (RULER) or load (LongBench) the samples and cut the perplexity blocks, once."""
    from tqdm.auto import tqdm

    from echokv.data import load_text
    from echokv.eval.sample import prompt_ids
    from echokv.models import kv_geometry

    suite = job.suite
    samples = []
    if suite.source == "ruler" and suite.tasks:
        from echokv.eval.ruler import RULER_TASKS, generate

        prose = load_text("evaluation")
        combos = [(t, j, c) for t in suite.tasks for j, c in enumerate(suite.context_lengths)]
        for task, j, length in tqdm(combos, desc="generating samples", disable=not progress, leave=False):
            depths = suite.depths if suites.uses_depths(task) else None
            haystack = prose if RULER_TASKS[task].options.get("haystack") == "essay" else None
            samples += generate(task, tokenizer, length, suite.samples, seed=suites.length_seed(job.seed, j),
                                depths=depths, haystack_text=haystack)
    elif suite.source == "longbench":
        from echokv.eval.longbench import load_longbench

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

    blocks = None
    if suite.perplexity is not None:
        from echokv.eval.perplexity import heldout_blocks

        blocks = heldout_blocks(tokenizer, suite.perplexity)
    return Inputs(cells, blocks, ids)


def _error_rows(base: dict, inputs: Inputs, message: str) -> list[dict]:
    rows = [{**base, **keys, "n": 0, "error": message} for keys, _ in inputs.cells]
    if inputs.ppl_blocks is not None:
        rows.append({**base, "task": PERPLEXITY, "context_length": int(inputs.ppl_blocks.shape[1]), "n": 0,
                     "error": message})
    return rows


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_method(name: str, ratio: float, model, tokenizer, job: EvalJob, inputs: Inputs, calibration,
               eos_ids: set[int], progress: bool = True, predictions: list | None = None) -> list[dict]:
    """Rows of one (method, ratio) over every cell, and its perplexity row; failures become error rows."""
    from tqdm.auto import tqdm

    from echokv.eval.metrics import score
    from echokv.methods import MethodUnavailable, make_method

    suite = job.suite
    base = {"method": name, "compression_ratio": float(ratio)}
    label = name if name == FULL else f"{name}@{ratio:g}"
    try:
        method = make_method(name, ratio, job.artifacts)
        start = time.perf_counter()
        method.prepare(model, tokenizer, calibration)
        prepare_seconds = time.perf_counter() - start
        info = method.info()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one method must not stop the others
        _report_failure(label, "prepare", exc)
        return _error_rows(base, inputs, _message(exc))

    rows: list[dict] = []
    unavailable: str | None = None
    bar = tqdm(total=inputs.n_samples, desc=label, disable=not progress or not inputs.n_samples, unit="sample")
    for keys, samples in inputs.cells:
        if unavailable:
            rows.append({**base, **keys, "n": 0, "error": unavailable})
            bar.update(len(samples))
            continue
        bar.set_postfix_str(f"{keys['task']} @ {keys['context_length']}")
        scores, kept, cache_bytes, full_bytes, new_tokens, prompt_tokens = [], [], [], [], [], []
        start = time.perf_counter()
        try:
            for sample in samples:
                context_ids, question_ids = inputs.prompt_ids[id(sample)]
                t0 = time.perf_counter()
                new_ids, report = method.generate(model, context_ids, question_ids, sample.max_new_tokens, eos_ids)
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
                                        "prediction": prediction, "answers": sample.answers, "score": value,
                                        "seconds": sample_seconds})
                bar.update(1)
        except (KeyboardInterrupt, SystemExit):
            bar.close()
            raise
        except Exception as exc:  # noqa: BLE001
            _report_failure(label, f"{keys['task']} @ {keys['context_length']}", exc)
            rows.append({**base, **keys, "n": 0, "error": _message(exc)})
            bar.update(len(samples) - len(scores))
            if isinstance(exc, MethodUnavailable):
                unavailable = _message(exc)
            continue
        seconds = time.perf_counter() - start
        n = len(scores)
        rows.append({
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
        })
    bar.close()

    if inputs.ppl_blocks is not None:
        from echokv.eval.perplexity import perplexity_row

        try:
            if unavailable:
                raise MethodUnavailable(unavailable)
            row = {**base, **perplexity_row(model, method, inputs.ppl_blocks, suite.perplexity.chunk, progress,
                                            desc=f"{label} perplexity")}
            row["prepare_seconds"] = prepare_seconds
            row["method_info"] = info
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001
            _report_failure(label, PERPLEXITY, exc)
            row = {**base, "task": PERPLEXITY, "context_length": int(inputs.ppl_blocks.shape[1]), "n": 0,
                   "error": _message(exc)}
        rows.append(row)
    return rows


def _report_failure(label: str, where: str, exc: BaseException) -> None:
    """Log that a method failed; with the end of the traceback unless it is unavailable here."""
    from echokv.methods import MethodUnavailable

    log.error("[echokv eval] %s failed (%s): %s", label, where, _message(exc))
    if not isinstance(exc, MethodUnavailable):
        log.error("%s", "".join(traceback.format_exception(exc, limit=-3)).rstrip())


def execute(job: EvalJob, model, tokenizer, progress: bool = True) -> list[dict]:
    """Check against the model, build the inputs once, run every (method, ratio), write the results."""
    from echokv.data import token_blocks
    from echokv.stats.collect import Calibration

    check_with_model(job, model)
    for note in job.notes + job.suite.notes:
        log.warning("[echokv eval] %s", note)
    inputs = build_inputs(job, model, tokenizer, progress)
    calibration = None
    if any(name != FULL for name, _ in job.runs):
        calibration = Calibration(token_blocks(tokenizer, "calibration", CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN))
    eos_ids = eos_token_ids(tokenizer, model)
    predictions: list[dict] = []
    rows: list[dict] = []
    for name, ratio in job.runs:
        rows += run_method(name, ratio, model, tokenizer, job, inputs, calibration, eos_ids, progress, predictions)
        if job.out is not None:  # after every method: a long run that is stopped keeps what it measured
            write(rows, predictions, job)
    return rows


def write(rows: list[dict], predictions: list[dict], job: EvalJob) -> dict[str, Path]:
    """``results.json`` (every row), ``report.md``, figures and ``predictions.jsonl`` in ``job.out``.

    Task rows go through :func:`echokv.eval.report.write_results`; perplexity rows, which are not
    scores of a task, get their own table and figure (:mod:`echokv.eval.perplexity`) appended to
    the report. Each file appears complete (:func:`~echokv.util.atomic_dir`); other files in ``job.out`` stay.
    """
    from echokv.util import atomic_dir

    out = job.out
    if out.is_dir() and job.overwrite:  # files of an earlier run that this one might not rewrite
        for path in list(out.glob("*.png")) + [out / f for f in GENERATED_FILES]:
            if path.is_file():
                path.unlink()
    with atomic_dir(out, overwrite=True, replace=False) as tmp:  # (make_job checked the folder)
        written = _write_files(rows, predictions, job, tmp)
    return {key: out / path.name for key, path in written.items()}


def _write_files(rows: list[dict], predictions: list[dict], job: EvalJob, out: Path) -> dict[str, Path]:
    from echokv.eval.perplexity import perplexity_table, plot_perplexity
    from echokv.eval.report import write_results

    task_rows = [r for r in rows if r.get("task") != PERPLEXITY]
    written = write_results(task_rows, out, job.suite.name)
    written["results"].write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ppl = perplexity_table(rows)
    if ppl:
        text = written["report"].read_text(encoding="utf-8").rstrip("\n")
        if not task_rows:
            text = text.rstrip() + "\n"  # the ppl suite: no task table above
        text += ("\n\n## Perplexity\n\nHeld-out perplexity of the evaluation split "
                 f"({_ppl_tokens(rows)} predicted tokens per method), streamed through each method's cache in "
                 f"chunks of {job.suite.perplexity.chunk} tokens (lower is better).\n\n" + "\n".join(ppl) + "\n")
        png = plot_perplexity(rows, out / f"{job.suite.name}_perplexity_vs_kept.png")
        if png is not None:
            written["perplexity_plot"] = png
            text += f"\n![perplexity vs kept KV fraction]({png.name})\n"
        written["report"].write_text(text, encoding="utf-8")
    path = out / "predictions.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    written["predictions"] = path
    return written


def _ppl_tokens(rows: list[dict]) -> int:
    """Predicted tokens behind a perplexity row (the same for every method)."""
    return max((int(r.get("tokens", 0)) for r in rows if r.get("task") == PERPLEXITY), default=0)


def run_eval(model, tokenizer, suite: str, methods, ratios, artifacts=None, data=None, tasks=None,
             context_lengths=None, samples: int | None = None, seed: int = 0, out=None, progress: bool = True,
             overwrite: bool = False) -> list[dict]:
    """Evaluate ``methods`` (at every ratio of ``ratios``; ``full`` once) on ``suite`` and return the rows.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer.
        suite: ``quick``, ``ruler``, ``longbench`` or ``ppl`` (see :mod:`echokv.eval.suites`).
        methods: method names (list or comma-separated string; ``"all"``: every available method).
        ratios: compression ratios in [0, 1) (list or comma-separated string).
        artifacts: EchoKV artifact folders, matched to the ratios by their training ratio.
        data: LongBench folder (``longbench`` suite only).
        tasks, context_lengths, samples: overrides of the suite's defaults.
        seed: seed of the RULER samples.
        out: folder for ``results.json``, ``report.md``, figures and ``predictions.jsonl`` (None: no files).
        progress: tqdm progress bars.
        overwrite: allow ``out`` to exist.

    Every check runs before any model work (:func:`make_job`, :func:`check_with_model`).
    """
    job = make_job(suite, methods, ratios, artifacts, data, tasks, context_lengths, samples, seed, out, overwrite)
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
        if r.get("error"):
            cell["error"] = r["error"]
            continue
        if r.get("task") == PERPLEXITY:
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
                values.append("error")
            elif t == PERPLEXITY:
                values.append(f"ppl {c['ppl']:.2f}")
            else:
                values.append(f"{100 * c['sum'] / c['n']:.1f}")
        seconds = sum(c["seconds"] for c in cells.values())
        lines.append(f"{key[1]:<16} {key[2]:>5g} {kept_text:>5} " + " ".join(f"{v:>16}" for v in values)
                     + f" {seconds:>8.1f}")
    return lines
