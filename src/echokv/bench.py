"""``echokv bench``: speed and memory of stock transformers, echokv full mode and compressed mode.

For each context length, in one run: prefill time, decode tokens/s, peak resident memory during the
run, and cache bytes, for four variants:

- ``stock``: transformers' default DynamicCache, SDPA attention
- ``full``: EchoKVCache in full mode (the echokv attention, output-identical to SDPA)
- ``explicit``: compressed, discarded heads rebuilt for every past token at every step (the reference)
- ``fast``: compressed, reconstruction folded into the query / applied after the weighted sum

Decode timings are interleaved across variants and repeated, and the medians are compared, so that
machine noise hits every variant alike. Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
from pathlib import Path

import torch

VARIANTS = ("stock", "full", "explicit", "fast")


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _new_cache(model, variant: str, recon):
    from transformers import DynamicCache

    from .cache import EchoKVCache

    if variant == "stock":
        return DynamicCache(config=model.config)
    mode = "full" if variant == "full" else "compressed"
    return EchoKVCache(model, recon, mode=mode, fast=variant == "fast")


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))


@torch.no_grad()
def _decode(model, cache, first_token: torch.Tensor, n: int) -> float:
    """Seconds for n greedy decode steps."""
    tok = first_token
    start = time.perf_counter()
    for _ in range(n):
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.no_grad()
def bench_context(model, recon, ids: torch.Tensor, decode_tokens: int, repeats: int, chunk: int = 512) -> dict:
    from .cache import prefill

    out = {}
    prefilled = {}
    for variant in VARIANTS:
        with _attention_for(model, variant):
            cache = _new_cache(model, variant, recon)
            with PeakRSS() as mem:
                t = time.perf_counter()
                logits = prefill(model, cache, ids, chunk_size=chunk)
                secs = time.perf_counter() - t
        prefilled[variant] = (cache, logits[:, None].argmax(-1))
        out[variant] = {"prefill_seconds": secs, "prefill_peak_rss_delta": mem.delta, "decode_seconds": []}
    for _ in range(repeats):
        for variant in VARIANTS:  # interleaved
            cache, first = prefilled[variant]
            work = copy.deepcopy(cache)
            with _attention_for(model, variant), PeakRSS() as mem:
                secs = _decode(model, work, first, decode_tokens)
            out[variant]["decode_seconds"].append(secs)
            out[variant]["decode_peak_rss_delta"] = max(out[variant].get("decode_peak_rss_delta", 0), mem.delta)
            out[variant]["cache_bytes"] = _cache_bytes(work)
    for variant in VARIANTS:
        med = statistics.median(out[variant]["decode_seconds"])
        out[variant]["decode_tokens_per_second"] = decode_tokens / med
    tps = {v: out[v]["decode_tokens_per_second"] for v in VARIANTS}
    return {
        "context": int(ids.shape[1]),
        "variants": out,
        "full_vs_stock_decode_ratio": tps["full"] / tps["stock"],
        "compressed_vs_full_decode_ratio": tps["fast"] / tps["full"],
        "explicit_vs_full_decode_ratio": tps["explicit"] / tps["full"],
        "fast_vs_explicit_decode_ratio": tps["fast"] / tps["explicit"],
        "kv_bytes_ratio": out["fast"]["cache_bytes"] / out["full"]["cache_bytes"],
        "kept_fraction": recon.layout.kept_fraction(),
    }


def _attention_for(model, variant: str):
    """Stock runs on transformers' own SDPA; echokv variants on the (output-identical) echokv attention."""
    from . import attention

    return attention.implementation(model, "sdpa" if variant == "stock" else attention.NAME)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["context"] for r in results]
    for v in VARIANTS:
        ax.plot(xs, [r["variants"][v]["decode_tokens_per_second"] for r in results], marker="o", label=v)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("decode speed vs context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args) -> int:
    from .artifact import load, read_config
    from .cli import _load
    from .data import require_tokens, token_blocks
    from .models import kv_geometry

    try:
        contexts = sorted({int(c) for c in args.contexts.split(",") if c.strip()})
    except ValueError:
        raise ValueError(f"--contexts must be comma-separated integers, got {args.contexts!r}") from None
    if not contexts or contexts[0] < 2:
        raise ValueError(f"--contexts needs lengths of at least 2 tokens, got {args.contexts!r}")
    read_config(args.artifact)
    model, tokenizer = _load(args)
    geo = kv_geometry(model)
    if geo.max_context and contexts[-1] + args.decode_tokens > geo.max_context:
        raise ValueError(f"context {contexts[-1]} + {args.decode_tokens} decode tokens exceeds the model's {geo.max_context}")
    recon = load(args.artifact, model)
    require_tokens(tokenizer, "evaluation", contexts[-1], contexts[-1])
    text = token_blocks(tokenizer, "evaluation", contexts[-1], contexts[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in contexts:
        print(f"context {n} ...", flush=True)
        r = bench_context(model, recon, text[:, :n], args.decode_tokens, args.repeats)
        results.append(r)
        v = r["variants"]
        print(
            f"  decode tok/s: stock {v['stock']['decode_tokens_per_second']:.1f}, full {v['full']['decode_tokens_per_second']:.1f}, "
            f"explicit {v['explicit']['decode_tokens_per_second']:.1f}, fast {v['fast']['decode_tokens_per_second']:.1f} | "
            f"full/stock {r['full_vs_stock_decode_ratio']:.3f}, fast/full {r['compressed_vs_full_decode_ratio']:.3f}, "
            f"fast/explicit {r['fast_vs_explicit_decode_ratio']:.2f}, KV bytes {r['kv_bytes_ratio']:.3f} "
            f"(kept fraction {r['kept_fraction']:.3f})",
            flush=True,
        )
    meta = {
        "model": args.model,
        "artifact": str(args.artifact),
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    (out / "bench.json").write_text(json.dumps({"meta": meta, "contexts": results}, indent=2))
    plot(results, out / "decode_speed.png")
    print(f"written {out / 'bench.json'} and {out / 'decode_speed.png'}")
    return 0
