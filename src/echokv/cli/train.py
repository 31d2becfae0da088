"""``echokv train``: calibrate, select, fit (stage 1), fine-tune (stage 2), write an artifact."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, TrainConfig, TrainOutput
from ._args import from_args

CONFIGS = (ModelConfig, TrainConfig, TrainOutput)
HELP = "train an EchoKV network (stage 1 + stage 2) and write an artifact"


def run(args) -> int:
    from .. import artifact, distributed
    from ..data import require_tokens
    from ..models import load_configured
    from ..training import check_data_parallel, train, validate
    from ..util import check_output_dir

    cfg, output = from_args(args, TrainConfig), from_args(args, TrainOutput)
    out = Path(output.out)
    check_output_dir(out, output.overwrite)
    cfg.ratios()
    check_data_parallel(cfg)
    cfg.progress = cfg.progress and distributed.is_main()
    # the groups training makes (S = 4 unless given; the paper layout searches S, so its map is not checked)
    groups = cfg.group_size or (4 if cfg.variant == "mix" or cfg.layout == "data" else None)
    model, tokenizer = load_configured(from_args(args, ModelConfig), groups=groups)
    validate(cfg, model)
    require_tokens(tokenizer, "calibration", cfg.calib_tokens, cfg.seq_len, cfg.text_paths)
    require_tokens(tokenizer, "evaluation", cfg.heldout_tokens, cfg.seq_len, cfg.text_paths)
    network, report = train(model, tokenizer, cfg)
    distributed.barrier()  # every rank finished: only then does rank 0 write
    if not distributed.is_main():
        return 0
    artifact.save(network, model, out, report, overwrite=output.overwrite)
    s1, s2 = report["stage1"], report["stage2"]
    print(
        f"wrote {out}: kept fraction {report['kept_fraction']:.3f} (K {report['kept_fraction_k']:.3f}, "
        f"V {report['kept_fraction_v']:.3f}), network {report['network_bytes'] / 1e6:.2f} MB"
    )
    print(f"stage 1: {s1['seconds']:.1f} s, calibration rel. error {s1['final_loss']:.4f}")
    print(
        f"stage 2: {s2['seconds']:.1f} s, held-out output MSE {s2['omse_before']:.4f} -> {s2['omse_after']:.4f}"
        + (f" (skipped: {s2['skipped']})" if s2.get("skipped") else
           " (kept the stage-1 weights: stage 2 did not lower the held-out error)" if s2["reverted_to_stage1"] else "")
    )
    print(f"total {report['total_seconds']:.1f} s; report in {out / artifact.REPORT}")
    return 0
