"""``echokv bench``: decode speed and cache bytes of the default cache and of echokv's (:mod:`echokv_lab.bench`)."""

from __future__ import annotations

import os

import torch

from echokv.cli._args import from_args
from echokv.config import BenchConfig

CONFIGS = (BenchConfig,)
HELP = "speed and memory: stock vs echokv full vs compressed"


def _fast_codecs(model, tokenizer, ratios: list[float], kernel: str, context: int | None) -> dict:
    """``{"echokv-q@R": codec}`` fitted on the calibration text (:func:`echokv.codecs.headq.fit`), each keeping
    ``1 - R`` of the full cache at ``context`` tokens, its exact ones included (None: its codes alone)."""
    from echokv.codecs.headq import fit_calibrated

    return {f"echokv-q@{r:g}": fit_calibrated(model, tokenizer, r, kernel=kernel, context=context) for r in ratios}


def _memory_bytes() -> int:
    """All the memory a cache could live in here: RAM and every visible GPU's."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return total


def _check_budgets(cfg: BenchConfig, texts: list[str], budgets: list, geometry: dict) -> None:
    """Budgets that parse but cannot run, refused before the model loads (the artifact records the model's
    geometry): one below a full-mode sequence (full mode, the reference, would hold nothing), or over the memory
    of this machine (the batches would never be allocated)."""
    from echokv.models import resolve_dtype

    tokens = cfg.budget_context + cfg.decode_tokens
    one = 2 * geometry["num_layers"] * geometry["num_kv_heads"] * geometry["head_dim"] * tokens * \
        resolve_dtype(cfg.dtype).itemsize
    memory = _memory_bytes()
    for text, (kind, value) in zip(texts, budgets, strict=True):
        size = value * one if kind == "full" else value
        if size > memory:
            raise ValueError(f"--kv-budget {text.strip()} is {size:.3g} bytes of KV cache, more than this machine's "
                             f"memory ({memory / 2**30:.1f} GiB); pass a budget that fits, e.g. 4x or 190MB")
        if size < one:
            raise ValueError(f"--kv-budget {text.strip()} is {size:.0f} bytes, less than one sequence of "
                             f"{tokens} tokens holds in full mode ({one} bytes in {cfg.dtype}; --budget-context "
                             f"{cfg.budget_context} + --decode-tokens {cfg.decode_tokens}): full mode, the reference, "
                             f"would hold nothing; pass at least 1x or {one} bytes")


def run(args) -> int:
    from echokv import kernels
    from echokv.artifact import load, read_config
    from echokv.data import require_tokens, token_blocks
    from echokv.models import kv_geometry, load_configured
    from echokv.placement import input_device
    from echokv.util import check_output_dir, parse_csv
    from echokv_lab import bench

    cfg = from_args(args, BenchConfig)
    ratios = [] if str(cfg.codec_ratios).strip().lower() == "none" else parse_csv(cfg.codec_ratios, float,
                                                                                   "compression ratio", "0.5,0.75")
    for r in ratios:
        if not 0 < r < 1:
            raise ValueError(f"--codec-ratios takes fractions of the cache removed, between 0 and 1, got {r:g}")
    if cfg.kernel != "auto":
        kernels.path(cfg.kernel, cfg.device)  # a forced kernel that cannot run fails here, before the model loads
    skip = str(cfg.contexts).strip().lower() == "none"
    contexts = [] if skip else sorted(set(parse_csv(cfg.contexts, int, "context length", "--contexts 512,2048")))
    if not skip and (not contexts or contexts[0] < 2):
        raise ValueError(f"--contexts needs lengths of at least 2 tokens, got {cfg.contexts!r}")
    texts = [] if cfg.kv_budget is None else parse_csv(cfg.kv_budget)
    budgets = [bench.parse_budget(b) for b in texts]
    if cfg.kv_budget is not None and not budgets:
        raise ValueError("--kv-budget is empty: pass e.g. --kv-budget 1x,2x,4x or --kv-budget 190MB")
    if not contexts and not budgets:
        raise ValueError("nothing to measure: --contexts none needs --kv-budget (e.g. --kv-budget 1x,2x,4x)")
    if budgets and cfg.budget_context < 2:
        raise ValueError(f"--budget-context needs at least 2 tokens, got {cfg.budget_context}")
    # writable, and no earlier bench.json or figure replaced without --overwrite, before minutes of timing
    files = ("bench.json",) + (("decode_speed.png",) if contexts else ()) + (("throughput_vs_budget.png",) if budgets
                                                                           else ())
    check_output_dir(cfg.out, overwrite=cfg.overwrite, replace=False, files=files)
    config = read_config(cfg.artifact)
    if budgets:
        _check_budgets(cfg, texts, budgets, config["model"]["geometry"])
    model, tokenizer = load_configured(cfg, groups=config["layout"]["groups"])
    geo = kv_geometry(model)
    longest = max(contexts + ([cfg.budget_context] if budgets else []))
    if geo.max_context and longest + cfg.decode_tokens > geo.max_context:
        raise ValueError(f"context {longest} + {cfg.decode_tokens} decode tokens exceeds the model's "
                         f"{geo.max_context}")
    network = load(cfg.artifact, model)
    # at a budget, the codecs' exact tokens count in what they keep (the budget is measured at that many tokens)
    codecs = _fast_codecs(model, tokenizer, ratios, cfg.kernel,
                          cfg.budget_context + cfg.decode_tokens if budgets else None)
    require_tokens(tokenizer, "evaluation", longest, longest)
    text = token_blocks(tokenizer, "evaluation", longest, longest).to(input_device(model))
    results = []
    for n in contexts:
        print(f"context {n} ...", flush=True)
        r = bench.bench_context(model, network, text[:, :n], cfg.decode_tokens, cfg.repeats, codecs=codecs)
        results.append(r)
        speed = {v: r["variants"][v]["decode_tokens_per_second"] for v in bench.VARIANTS}
        print(
            "  decode tok/s: " + ", ".join(f"{v} {s:.1f}" for v, s in speed.items()) + " | "
            f"full/stock {r['full_vs_stock_decode_ratio']:.3f}, fast/full {r['fast_vs_full_decode_ratio']:.3f}, "
            f"fast/stock {r['fast_vs_stock_decode_ratio']:.3f}, "
            f"fast/explicit {r['fast_vs_explicit_decode_ratio']:.2f}, KV bytes {r['kv_bytes_ratio']:.3f} "
            f"(kept fraction {r['kept_fraction']:.3f}) | prefill vs stock: compressing between chunks "
            f"{r['fast_vs_stock_prefill_ratio']:.2f}, exact prompt {r['fast_exact_prompt_vs_stock_prefill_ratio']:.2f}",
            flush=True,
        )
        for v, c in r.get("codecs", {}).items():
            print(f"  {v} ({c['kernel_path']} kernel): q/full {c['q_vs_full_decode_ratio']:.3f}, "
                  f"q/stock {c['q_vs_stock_decode_ratio']:.3f}, KV bytes {c['kv_bytes_ratio']:.3f} | prefill vs "
                  f"stock: compressing between chunks {c['q_vs_stock_prefill_ratio']:.2f}, exact prompt "
                  f"{c['q_exact_prompt_vs_stock_prefill_ratio']:.2f}", flush=True)
    if cfg.compare_dtype not in ("none", cfg.dtype):
        from dataclasses import replace

        other, _ = load_configured(replace(cfg, dtype=cfg.compare_dtype, offload_folder=None))  # (its own offload folder)
        for n, r in zip(contexts, results, strict=True):
            d = bench.dtype_context({cfg.dtype: model, cfg.compare_dtype: other}, text[:, :n], cfg.decode_tokens,
                                    cfg.repeats)
            r["dtype_comparison"] = d
            speed = {k: v["decode_tokens_per_second"] for k, v in d["dtypes"].items()}
            print(f"context {n}: default cache, {cfg.dtype} vs {cfg.compare_dtype}: decode tok/s "
                  + " vs ".join(f"{s:.1f}" for s in speed.values())
                  + f" ({d['decode_ratio']:.2f}x), prefill {d['prefill_ratio']:.2f}x as fast", flush=True)
        del other
    budget = None
    if budgets:
        print(f"KV budgets at {cfg.budget_context} tokens ...", flush=True)
        budget = bench.budget_context(model, network, text[:, : cfg.budget_context], budgets, cfg.decode_tokens,
                                      cfg.repeats, codecs=codecs)
        for r in budget["budgets"]:
            rows = r["variants"]
            print(f"  budget {r['budget_bytes'] / 1e6:.1f} MB ({r['budget']}): "
                  + ", ".join(f"{v} batch {rows[v]['batch']} {rows[v]['decode_tokens_per_second']:.1f} tok/s"
                              for v in rows)
                  + " | throughput vs full: "
                  + ", ".join(f"{v} {x:.2f}" for v, x in r["budget_throughput_vs_full"].items() if x is not None),
                  flush=True)
    path = kernels.path(cfg.kernel, cfg.device) if codecs else None
    meta = {"model": cfg.model, "artifact": str(cfg.artifact), "decode_tokens": cfg.decode_tokens,
            "repeats": cfg.repeats, "threads": torch.get_num_threads(), "dtype": cfg.dtype,
            "compare_dtype": cfg.compare_dtype, "kv_budget": cfg.kv_budget, "budget_context": cfg.budget_context,
            "codec_ratios": ratios, "kernel": cfg.kernel,
            "kernel_path": path, "kernel_instructions": kernels.instructions(cfg.kernel, cfg.device) if codecs else None,
            "kernel_build": kernels.cpu.origin if path == "cpp" else None}  # "prebuilt (avx2)" or "built here"
    written = bench.write(results, meta, cfg.out, budget)
    print("written " + ", ".join(str(p) for p in written))
    return 0
