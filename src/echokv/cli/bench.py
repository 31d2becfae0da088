"""``echokv bench``: decode speed and cache bytes of the default cache and of echokv's (:mod:`echokv.bench`)."""

from __future__ import annotations

import torch

from ..config import BenchConfig
from ._args import from_args

CONFIGS = (BenchConfig,)
HELP = "speed and memory: stock vs echokv full vs compressed"


def run(args) -> int:
    from .. import bench
    from ..artifact import load, read_config
    from ..data import require_tokens, token_blocks
    from ..models import kv_geometry
    from ..placement import input_device
    from ..util import check_output_dir, parse_csv

    cfg = from_args(args, BenchConfig)
    contexts = sorted(set(parse_csv(cfg.contexts, int, "context length", "--contexts 512,2048")))
    if not contexts or contexts[0] < 2:
        raise ValueError(f"--contexts needs lengths of at least 2 tokens, got {cfg.contexts!r}")
    check_output_dir(cfg.out, overwrite=True, replace=False)  # writable, before minutes of timing
    model, tokenizer = cfg.load(groups=read_config(cfg.artifact)["layout"]["groups"])
    geo = kv_geometry(model)
    if geo.max_context and contexts[-1] + cfg.decode_tokens > geo.max_context:
        raise ValueError(f"context {contexts[-1]} + {cfg.decode_tokens} decode tokens exceeds the model's "
                         f"{geo.max_context}")
    recon = load(cfg.artifact, model)
    require_tokens(tokenizer, "evaluation", contexts[-1], contexts[-1])
    text = token_blocks(tokenizer, "evaluation", contexts[-1], contexts[-1]).to(input_device(model))
    results = []
    for n in contexts:
        print(f"context {n} ...", flush=True)
        r = bench.bench_context(model, recon, text[:, :n], cfg.decode_tokens, cfg.repeats)
        results.append(r)
        speed = {v: r["variants"][v]["decode_tokens_per_second"] for v in bench.VARIANTS}
        print(
            "  decode tok/s: " + ", ".join(f"{v} {s:.1f}" for v, s in speed.items()) + " | "
            f"full/stock {r['full_vs_stock_decode_ratio']:.3f}, fast/full {r['fast_vs_full_decode_ratio']:.3f}, "
            f"fast/stock {r['fast_vs_stock_decode_ratio']:.3f}, "
            f"fast/explicit {r['fast_vs_explicit_decode_ratio']:.2f}, KV bytes {r['kv_bytes_ratio']:.3f} "
            f"(kept fraction {r['kept_fraction']:.3f})",
            flush=True,
        )
    if cfg.compare_dtype not in ("none", cfg.dtype):
        from dataclasses import replace

        other, _ = replace(cfg, dtype=cfg.compare_dtype, offload_folder=None).load()  # (its own offload folder)
        for n, r in zip(contexts, results, strict=True):
            d = bench.dtype_context({cfg.dtype: model, cfg.compare_dtype: other}, text[:, :n], cfg.decode_tokens,
                                    cfg.repeats)
            r["dtype_comparison"] = d
            speed = {k: v["decode_tokens_per_second"] for k, v in d["dtypes"].items()}
            print(f"context {n}: default cache, {cfg.dtype} vs {cfg.compare_dtype}: decode tok/s "
                  + " vs ".join(f"{s:.1f}" for s in speed.values())
                  + f" ({d['decode_ratio']:.2f}x), prefill {d['prefill_ratio']:.2f}x as fast", flush=True)
        del other
    meta = {"model": cfg.model, "artifact": str(cfg.artifact), "decode_tokens": cfg.decode_tokens,
            "repeats": cfg.repeats, "threads": torch.get_num_threads(), "dtype": cfg.dtype,
            "compare_dtype": cfg.compare_dtype}
    json_path, png_path = bench.write(results, meta, cfg.out)
    print(f"written {json_path} and {png_path}")
    return 0
