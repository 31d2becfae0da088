"""``echokv bench``: speed and memory of stock transformers, echokv full mode and compressed mode.

For each context length, in one run: prefill time, decode tokens/s, peak resident memory during the
run, and cache bytes, for four variants:

- ``stock``: transformers' default DynamicCache, SDPA attention
- ``full``: EchoKVCache in full mode (the echokv attention, output-identical to SDPA; K/V appended
  in place, where the default cache copies the whole layer with ``torch.cat`` at every step)
- ``explicit``: compressed, discarded heads rebuilt for every past token at every step (the reference)
- ``fast``: compressed, reconstruction folded into the query / applied after the weighted sum

Decode is timed step by step, interleaved across variants (each round advances every variant by one
token) and repeated; ratios are medians of per-step ratios within a round, so machine noise hits every
variant alike. Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from .models import cache_kwarg

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


def _cache_bytes(cache, reserved: bool = False) -> int:
    """Bytes of the cached tokens (``reserved``: of the memory allocated for them, spare room included)."""
    if hasattr(cache, "nbytes"):
        return cache.reserved_nbytes() if reserved else cache.nbytes()
    return sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))


@torch.no_grad()
def _step(model, cache, tok: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One greedy decode step: the next token and its seconds."""
    start = time.perf_counter()
    logits = model(input_ids=tok, use_cache=True, **cache_kwarg(model, cache)).logits
    secs = time.perf_counter() - start
    return logits[:, -1:].argmax(-1), secs


@torch.no_grad()
def bench_context(model, recon, ids: torch.Tensor, decode_tokens: int, repeats: int, chunk: int = 512) -> dict:
    """Prefill each variant once, then time decoding interleaved step by step.

    Every round advances each variant by one token, in a rotating order, so that slow drifts of a
    shared machine (other jobs, frequency changes) hit all variants alike; a ratio is the median of
    the per-step ratios of the same round, which cancels what the round had in common.
    """
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
        # peak memory of decoding, in an untimed pass of its own (the timed rounds mix variants)
        work = copy.deepcopy(cache)
        tok = prefilled[variant][1]
        with _attention_for(model, variant), PeakRSS() as mem:
            for _ in range(min(decode_tokens, 4)):
                tok, _ = _step(model, work, tok)
        out[variant]["decode_peak_rss_delta"] = mem.delta
        out[variant]["cache_bytes"] = _cache_bytes(work)
        out[variant]["reserved_cache_bytes"] = _cache_bytes(work, reserved=True)
        del work
    steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        work = {v: copy.deepcopy(prefilled[v][0]) for v in VARIANTS}
        tok = {v: prefilled[v][1] for v in VARIANTS}
        round_secs = {v: 0.0 for v in VARIANTS}
        for i in range(decode_tokens):
            for j in range(len(VARIANTS)):
                v = VARIANTS[(i + j) % len(VARIANTS)]
                with _attention_for(model, v):
                    tok[v], secs = _step(model, work[v], tok[v])
                steps[v].append(secs)
                round_secs[v] += secs
        for v in VARIANTS:
            out[v]["decode_seconds"].append(round_secs[v])
        del work
    for v in VARIANTS:
        out[v]["decode_tokens_per_second"] = 1.0 / statistics.median(steps[v])

    def speedup(a: str, b: str) -> float:
        """Decode speed of a relative to b: median over steps of b's seconds / a's seconds."""
        return statistics.median(sb / sa for sa, sb in zip(steps[a], steps[b]))

    return {
        "context": int(ids.shape[1]),
        "variants": out,
        "full_vs_stock_decode_ratio": speedup("full", "stock"),
        "compressed_vs_full_decode_ratio": speedup("fast", "full"),
        "compressed_vs_stock_decode_ratio": speedup("fast", "stock"),
        "explicit_vs_full_decode_ratio": speedup("explicit", "full"),
        "fast_vs_explicit_decode_ratio": speedup("fast", "explicit"),
        "kv_bytes_ratio": out["fast"]["cache_bytes"] / out["full"]["cache_bytes"],
        "kv_reserved_bytes_ratio": out["fast"]["reserved_cache_bytes"] / out["stock"]["cache_bytes"],
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
            f"fast/stock {r['compressed_vs_stock_decode_ratio']:.3f}, "
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
