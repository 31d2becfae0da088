"""``echokv eval``: methods side by side on one suite (:mod:`echokv.eval.runner`)."""

from __future__ import annotations

import sys
import time

from ..config import EvalConfig
from ._args import from_args

CONFIGS = (EvalConfig,)
HELP = "evaluate methods side by side (quick, ruler, longbench, ppl)"


def run(args) -> int:
    """Validate, load the model, check against it, evaluate, write and summarise."""
    from ..eval import runner

    start = time.perf_counter()
    cfg = from_args(args, EvalConfig)
    job = runner.make_job(cfg.suite, cfg.methods, cfg.compression_ratios, cfg.artifacts, cfg.data, cfg.tasks,
                          cfg.context_lengths, cfg.samples, cfg.seed, cfg.out, cfg.overwrite)
    model, tokenizer = cfg.load()
    rows = runner.execute(job, model, tokenizer, progress=True)
    errors = [r for r in rows if r.get("error")]
    print("\n".join(runner.summary_lines(rows)))
    print(f"wrote {job.out / 'report.md'} and {job.out / 'results.json'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    if errors:
        print(f"{len(errors)} result row(s) hold errors; see the report", file=sys.stderr)
    return 0
