"""``echokv analyze``: head similarity (R2 between every pair of KV heads), JSON and heatmaps; with ``--artifact``,
the referee's analyses of a trained artifact (:mod:`echokv_lab.referee`)."""

from __future__ import annotations

from pathlib import Path

from echokv.cli._args import from_args
from echokv.config import AnalyzeConfig

CONFIGS = (AnalyzeConfig,)
HELP = "head-similarity analysis: JSON and heatmaps"


def run(args) -> int:
    """Cheap checks (out folder, --layers format) before loading the model, checks that need the model or
    tokenizer (layer range, memory, text length) before the capture; the folder is written atomically."""
    from echokv.data import require_tokens, token_blocks
    from echokv.models import kv_geometry, load_configured
    from echokv.util import check_output_dir
    from echokv_lab import similarity

    cfg = from_args(args, AnalyzeConfig)
    out = Path(cfg.out).expanduser()
    check_output_dir(out, cfg.overwrite)
    if cfg.artifact is not None:
        return _referee(cfg, out)
    if cfg.layers is not None:
        similarity.parse_layers(cfg.layers)
    model, tokenizer = load_configured(cfg)
    geo = kv_geometry(model)
    layers = similarity.resolve_layers(geo, cfg.layers)
    similarity.check_size(geo, layers)
    if geo.max_context and cfg.seq_len > geo.max_context:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {geo.max_context} tokens")
    require_tokens(tokenizer, "calibration", cfg.calib_tokens, cfg.seq_len, cfg.text)
    blocks = token_blocks(tokenizer, "calibration", cfg.calib_tokens, cfg.seq_len, cfg.text)

    result = similarity.head_similarity(model, blocks, layers, progress=True)
    result["model"] = getattr(model, "echokv_name", None) or cfg.model
    result["seq_len"] = cfg.seq_len
    result["text"] = [str(p) for p in cfg.text] if cfg.text else None
    skipped = [i for i in (range(geo.num_layers) if cfg.layers is None else similarity.parse_layers(cfg.layers))
               if i in set(geo.sliding_layers)]
    result["sliding_layers_skipped"] = skipped
    written = similarity.write_analysis(result, out, cfg.overwrite)

    sk, sv = result["summary"]["k"], result["summary"]["v"]

    def fmt(x):
        return "   n/a" if x is None else f"{x:6.3f}"

    print(
        f"analyzed {len(layers)} layers x {geo.num_kv_heads} KV heads ({len(result['heads'])} heads) of "
        f"{result['model']} on {result['tokens']} tokens in {result['seconds']:.1f} s"
        + (f" (sliding-window layers {similarity.ranges(skipped)} skipped)" if skipped else "")
    )
    print("mean R2, one head predicted from one other:    K       V")
    print(f"  within a layer                           {fmt(sk['mean_within_layer'])}  {fmt(sv['mean_within_layer'])}")
    print(f"  adjacent layers                          {fmt(sk['mean_adjacent_layer'])}  {fmt(sv['mean_adjacent_layer'])}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _referee(cfg: AnalyzeConfig, out: Path) -> int:
    from echokv import artifact
    from echokv.models import load_configured
    from echokv_lab import referee

    artifact.read_config(cfg.artifact)  # a broken artifact is refused before the model loads
    model, tokenizer = load_configured(cfg)
    result = referee.analyze(model, tokenizer, cfg.artifact, cfg.seq_len, cfg.text)
    written = referee.write(result, out, cfg.overwrite)
    ac = result["across_sources"]
    print(f"analysed {cfg.artifact} on {len(result['per_source'])} texts and one sequence of "
          f"{result['by_position']['tokens']} tokens in {result['seconds']:.1f} s")
    for key, name in (("k", "K"), ("v", "V"), ("output", "attention output")):
        print(f"  {name} relative error: mean {ac[key]['mean']:.4g} over the texts "
              f"(range {ac[key]['min']:.4g}-{ac[key]['max']:.4g})")
    for path in written:
        print(f"wrote {path}")
    return 0
