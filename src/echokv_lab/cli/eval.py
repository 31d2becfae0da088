"""``echokv eval``: methods side by side on one suite (:mod:`echokv_lab.eval.runner`)."""

from __future__ import annotations

import logging
import sys
import time

from echokv.cli._args import from_args
from echokv.config import EvalConfig

CONFIGS = (EvalConfig,)
HELP = "evaluate methods side by side (quick, ruler, longbench, ppl, long, fidelity)"


class _DropGGUFDtypeWarning(logging.Filter):
    """transformers 5.24 warns that a GGUF checkpoint "with its weights packed is fastest in float32" whenever
    another dtype is asked for; the embedded models are dequantised on load (plain bfloat16 ``nn.Linear``
    weights, measured), so the warning does not apply to them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "fastest in float32" not in record.getMessage()


def quiet_gguf_dtype_warning() -> None:
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    if not any(isinstance(f, _DropGGUFDtypeWarning) for f in logger.filters):
        logger.addFilter(_DropGGUFDtypeWarning())


def run(args) -> int:
    """Validate, load the model, check against it, evaluate, write and summarise.

    Exit status: 0 when every requested cell ran or was skipped with a stated reason (a ratio a method cannot
    reach, no artifact for a ratio, no peers environment); 1 when a method failed (its rows hold ``error``);
    2 (from the dispatcher) for a mistake in the request, before any work.
    """
    from echokv import distributed
    from echokv_lab.eval import runner

    start = time.perf_counter()
    cfg = from_args(args, EvalConfig)
    job = runner.make_job(cfg.suite, cfg.methods, cfg.compression_ratios, cfg.artifacts, cfg.data, cfg.tasks,
                          cfg.context_lengths, cfg.samples, cfg.seed, cfg.out, cfg.overwrite, split=cfg.split,
                          text=cfg.text, resume=cfg.resume, train_missing=cfg.train_missing, peers=cfg.peers,
                          model_name=cfg.model, dtype=cfg.dtype, inputs_file=cfg.inputs)
    quiet_gguf_dtype_warning()
    from echokv.artifact import read_config
    from echokv.models import load_configured

    groups = [g for path in cfg.artifacts or [] for g in read_config(path)["layout"]["groups"]]
    model, tokenizer = load_configured(cfg, groups=groups or None)
    rows = runner.execute(job, model, tokenizer, progress=distributed.is_main())
    errors = [r for r in rows if r.get("error")]
    if not distributed.is_main():  # rank 0 reports for all (the same rows, so the same exit status)
        return 1 if errors else 0
    skipped = {(r["method"], r.get("compression_ratio")): r["skipped"] for r in rows if r.get("skipped")}
    print("\n".join(runner.summary_lines(rows)))
    for (method, ratio), why in skipped.items():
        print(f"{method}@{ratio:g}: {why}")
    print(f"wrote {job.out / 'report.md'} and {job.out / 'results.json'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    if errors:
        print(f"echokv: error: {len(errors)} result row(s) hold errors (a method failed): "
              f"{errors[0]['method']}: {errors[0]['error']}; see {job.out / 'report.md'}", file=sys.stderr)
        return 1
    return 0
