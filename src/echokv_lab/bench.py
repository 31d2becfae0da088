"""``echokv bench``: speed and memory of transformers' default cache and of echokv's cache, full and compressed.

For each context length, in one run: prefill time, decode tokens/s, peak resident memory during the
run, and cache bytes, for four variants (the keys of ``bench.json``):

- ``stock``: transformers' default DynamicCache, SDPA attention
- ``echokv-full``: EchoKVCache in full mode (the echokv attention, output-identical to SDPA; K/V appended
  in place, where the default cache copies the whole layer with ``torch.cat`` at every step)
- ``echokv-explicit``: compressed, discarded heads rebuilt for every past token at every step (the reference)
- ``echokv-fast``: compressed, reconstruction folded into the query / applied after the weighted sum
- ``echokv-q@R`` (one per ``codecs`` ratio R): the fast codec EchoKV-Q (:mod:`echokv.codecs.headq`), per-head codes
  read in place by the fused kernel; ``q_vs_full_decode_ratio`` / ``q_vs_stock_decode_ratio`` per ratio, and the
  kernel path that ran (``kernel_path``: cpp, triton or torch), ``q_vs_stock_prefill_ratio`` and
  ``q_exact_prompt_vs_stock_prefill_ratio`` (prefill over the default cache's, compressing between chunks or once after
  the prompt)

Prefill is timed again, alternating the default cache and the compressed one fed both ways
(``fast_vs_stock_prefill_ratio``: compressing between chunks; ``fast_exact_prompt_vs_stock_prefill_ratio``:
compressing once after the prompt, :func:`echokv.generation.prefill` with ``exact_prompt``).

Ratios ``a_vs_b_decode_ratio`` are decode speeds of a relative to b, with ``full`` = echokv-full,
``fast`` = echokv-fast, ``explicit`` = echokv-explicit, ``stock`` = stock (``full_vs_stock``,
``fast_vs_full``, ``fast_vs_stock``, ``explicit_vs_full``, ``fast_vs_explicit``); ``kv_bytes_ratio`` is
echokv-fast's cache bytes over echokv-full's, ``kv_reserved_bytes_ratio`` echokv-fast's allocated bytes over
stock's. Decode is timed step by step, interleaved across variants (each round advances every variant by one
token) and repeated; ratios are medians of per-step ratios within a round, so machine noise hits every
variant alike. Ratios, not absolute times, are the result.

At a KV-memory budget (:func:`budget_context`, ``--kv-budget``), each variant decodes the largest batch whose cache,
measured after the timed tokens, fits the budget; ``budget_throughput_vs_full`` is its summed decode tokens/s over
full mode's at the same budget: what compression buys when memory, not one sequence's latency, is the limit.

With a second dtype (``--compare-dtype``, default float32), each context also times the default cache of the
same model loaded in that dtype against the first (:func:`dtype_context`): bf16 is faster for prefill-sized
matmuls and slower for the batch-1 products of decoding on CPUs, so both are reported.
"""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from echokv import plotting
from echokv.attention import echokv_attention, implementation
from echokv.cache import accounting
from echokv.codecs.mix import EchoKVCache
from echokv.generation import PREFILL_CHUNK, prefill
from echokv.models import cache_kwarg

STOCK, FULL, EXPLICIT, FAST = "stock", "echokv-full", "echokv-explicit", "echokv-fast"
VARIANTS = (STOCK, FULL, EXPLICIT, FAST)
#: what a user would deploy at a budget (the explicit path is only the reference of the fast one)
BUDGET_VARIANTS = (STOCK, FULL, FAST)


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


def _new_cache(model, variant: str, network, codecs: dict | None = None):
    from transformers import DynamicCache

    from echokv.cache import CompressedCache

    if variant == STOCK:
        return DynamicCache(config=model.config)
    if codecs and variant in codecs:
        return CompressedCache(model, codecs[variant], mode="compressed", fast=True)
    mode = "full" if variant == FULL else "compressed"
    return EchoKVCache(model, network, mode=mode, fast=variant == FAST)


@torch.no_grad()
def _step(model, cache, tok: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One greedy decode step: the next token and its seconds."""
    start = time.perf_counter()
    logits = model(input_ids=tok, use_cache=True, **cache_kwarg(model, cache)).logits
    secs = time.perf_counter() - start
    return logits[:, -1:].argmax(-1), secs


def _interleaved(prefilled: dict, step, decode_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of every decode step of each entry of ``prefilled`` (name -> (cache, next tokens)), ``repeats``
    rounds of ``decode_tokens`` steps from a copy of the prefilled cache. A round advances every entry by one
    token in a rotating order, so slow drifts of a shared machine hit all alike. ``step(name, cache, tok)``
    returns the next tokens and the step's seconds."""
    names = list(prefilled)
    steps: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        work = {n: copy.deepcopy(prefilled[n][0]) for n in names}
        tok = {n: prefilled[n][1] for n in names}
        for i in range(decode_tokens):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                tok[n], secs = step(n, work[n], tok[n])
                steps[n].append(secs)
        del work
    return steps


def _step_as(model):
    """``step`` for :func:`_interleaved` over variants of one model, each in its attention implementation."""
    def step(variant, cache, tok):
        with _attention_for(model, variant):
            return _step(model, cache, tok)

    return step


@torch.no_grad()
def bench_context(model, network, ids: torch.Tensor, decode_tokens: int, repeats: int,
                  chunk: int = PREFILL_CHUNK, codecs: dict | None = None) -> dict:
    """Prefill each variant once, then time decoding interleaved step by step.

    Every round advances each variant by one token, in a rotating order, so that slow drifts of a
    shared machine (other jobs, frequency changes) hit all variants alike; a ratio is the median of
    the per-step ratios of the same round, which cancels what the round had in common.
    """
    out = {}
    prefilled = {}
    codecs = codecs or {}
    for variant in (*VARIANTS, *codecs):
        with _attention_for(model, variant):
            cache = _new_cache(model, variant, network, codecs)
            with PeakRSS() as mem:
                t = time.perf_counter()
                logits = prefill(model, cache, ids, chunk_size=chunk)
                secs = time.perf_counter() - t
        prefilled[variant] = (cache, logits[:, None].argmax(-1))
        out[variant] = {"prefill_seconds": secs, "prefill_peak_rss_delta": mem.delta}
        # peak memory of decoding, in an untimed pass of its own (the timed rounds mix variants)
        work, tok = _batch(prefilled[variant], 1)
        with PeakRSS() as mem:
            _decode(model, work, tok, min(decode_tokens, 4), variant)
        out[variant]["decode_peak_rss_delta"] = mem.delta
        out[variant]["cache_bytes"] = accounting.nbytes(work)
        out[variant]["reserved_cache_bytes"] = accounting.reserved_nbytes(work)
        del work
    steps = _interleaved(prefilled, _step_as(model), decode_tokens, repeats)
    for v in (*VARIANTS, *codecs):
        out[v]["decode_seconds"] = [sum(steps[v][r * decode_tokens : (r + 1) * decode_tokens])
                                    for r in range(repeats)]
        out[v]["decode_tokens_per_second"] = 1.0 / statistics.median(steps[v])

    def speedup(a: str, b: str) -> float:
        """Decode speed of a relative to b: median over steps of b's seconds / a's seconds."""
        return statistics.median(sb / sa for sa, sb in zip(steps[a], steps[b]))

    prefill_ratios = _prefill_ratios(model, network, ids, min(repeats, 2), chunk, codecs)
    q_prefill = prefill_ratios.pop("q_vs_stock_prefill")
    return {
        "context": int(ids.shape[1]),
        "variants": out,
        **prefill_ratios,
        "full_vs_stock_decode_ratio": speedup(FULL, STOCK),
        "fast_vs_full_decode_ratio": speedup(FAST, FULL),
        "fast_vs_stock_decode_ratio": speedup(FAST, STOCK),
        "explicit_vs_full_decode_ratio": speedup(EXPLICIT, FULL),
        "fast_vs_explicit_decode_ratio": speedup(FAST, EXPLICIT),
        "kv_bytes_ratio": out[FAST]["cache_bytes"] / out[FULL]["cache_bytes"],
        "kv_reserved_bytes_ratio": out[FAST]["reserved_cache_bytes"] / out[STOCK]["cache_bytes"],
        "kept_fraction": network.layout.kept_fraction(),
        **({"codecs": {v: {"q_vs_full_decode_ratio": speedup(v, FULL), "q_vs_stock_decode_ratio": speedup(v, STOCK),
                           "kv_bytes_ratio": out[v]["cache_bytes"] / out[FULL]["cache_bytes"],
                           "q_vs_stock_prefill_ratio": q_prefill[v][0],
                           "q_exact_prompt_vs_stock_prefill_ratio": q_prefill[v][1],
                           "kernel_path": codecs[v].kernel_path(ids.device)} for v in codecs}} if codecs else {}),
    }


@torch.no_grad()
def _prefill_ratios(model, network, ids: torch.Tensor, repeats: int, chunk: int, codecs: dict | None = None) -> dict:
    """Prefill speed of the compressed cache relative to the default cache, both ways of feeding a prompt:
    compressing between chunks (each chunk rebuilds the compressed past) and with ``exact_prompt`` (compressing
    once, after the prompt); and of each codec of ``codecs`` (compressing between chunks: ``q_vs_stock_prefill``).
    Prefills alternate, and a ratio is the median of those of the same round."""
    codecs = codecs or {}
    runs: dict[str, list[float]] = {"stock": [], "chunks": [], "exact": [],
                                    **{name: [] for v in codecs for name in (v, f"{v} exact")}}
    for _ in range(repeats):
        for name, secs in runs.items():
            variant = {"stock": STOCK, "chunks": FAST, "exact": FAST}.get(name, name.removesuffix(" exact"))
            with _attention_for(model, variant):
                cache = _new_cache(model, variant, network, codecs)
                t = time.perf_counter()
                prefill(model, cache, ids, chunk_size=chunk, exact_prompt=name.endswith("exact"))
                secs.append(time.perf_counter() - t)
            del cache

    def over_stock(name):
        return statistics.median(s / f for s, f in zip(runs["stock"], runs[name]))

    return {
        "q_vs_stock_prefill": {v: (over_stock(v), over_stock(f"{v} exact")) for v in codecs},
        "fast_vs_stock_prefill_ratio": over_stock("chunks"),
        "fast_exact_prompt_vs_stock_prefill_ratio": over_stock("exact"),
        "prefill_seconds": {k: statistics.median(v) for k, v in runs.items()},
    }


def parse_budget(item: str) -> tuple[str, float]:
    """One ``--kv-budget`` entry: ``("bytes", n)`` for ``190000000``, ``190MB``, ``1.5GiB``; ``("full", n)`` for
    ``4x``: the bytes full mode holds for a batch of n sequences, measured in the run."""
    text = str(item).strip()
    low = text.lower()
    try:
        if low.endswith("x"):
            value, kind = float(low[:-1]), "full"
            if value != int(value):
                raise ValueError
        else:
            units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 1e9, "mb": 1e6, "kb": 1e3, "b": 1}
            unit = next((u for u in units if low.endswith(u)), "b")
            value, kind = float(low[: len(low) - len(unit)] if low.endswith(unit) else low) * units[unit], "bytes"
    except (ValueError, OverflowError):
        value, kind = float("nan"), "bytes"
    if not value > 0 or value == float("inf"):
        raise ValueError(f"--kv-budget entry {text!r} is not a positive size: pass bytes (190000000), a size with a "
                         "unit (190MB, 1.5GiB) or a whole number of full-mode sequences (4x)")
    return kind, value


def _decode(model, cache, tok, steps: int, variant: str) -> torch.Tensor:
    with _attention_for(model, variant):
        for _ in range(steps):
            tok, _ = _step(model, cache, tok)
    return tok


def _batch(prefilled, batch: int):
    """A cache of ``batch`` copies of the prefilled sequence, and its next tokens."""
    cache, tok = prefilled
    cache = copy.deepcopy(cache)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache, tok.repeat_interleave(batch, dim=0)


@torch.no_grad()
def budget_context(model, network, ids: torch.Tensor, budgets: list, decode_tokens: int, repeats: int,
                   chunk: int = PREFILL_CHUNK, codecs: dict | None = None) -> dict:
    """Throughput at fixed KV-memory budgets, for one prompt length.

    ``budgets``: bytes, or :func:`parse_budget`'s pairs (``("full", n)``: the bytes full mode holds for a batch of
    n, measured). Each variant (:data:`BUDGET_VARIANTS`) gets the largest batch whose cache, holding the prompt
    and ``decode_tokens`` more tokens, fits: a guess from one sequence's bytes, then checked on the batch itself (an untimed pass that also
    gives peak memory), one sequence fewer while it does not fit. The batch is copies of one prefilled prompt
    (decode cost does not depend on the tokens). Decode is timed interleaved as in :func:`bench_context`;
    ``budget_throughput_vs_full`` is the median over steps of a variant's batch / seconds over full mode's.
    """
    prefilled, one = {}, {}
    codecs = codecs or {}
    variants = (*BUDGET_VARIANTS, *codecs)
    for v in variants:
        with _attention_for(model, v):
            cache = _new_cache(model, v, network, codecs)
            logits = prefill(model, cache, ids, chunk_size=chunk)
        prefilled[v] = (cache, logits[:, None].argmax(-1))
        work, tok = _batch(prefilled[v], 1)
        _decode(model, work, tok, decode_tokens, v)
        one[v] = accounting.reserved_nbytes(work)
        del work
    results = []
    for budget in budgets:
        kind, value = budget if isinstance(budget, tuple) else ("bytes", budget)
        if kind == "full":  # what full mode holds for that batch, measured: buffers grow with spare room
            work, tok = _batch(prefilled[FULL], int(value))
            _decode(model, work, tok, decode_tokens, FULL)
            limit = accounting.reserved_nbytes(work)
            del work
        else:
            limit = int(value)
        rows, ready = {}, {}
        for v in variants:
            batch, held, peak = limit // one[v], 0, 0
            while batch > 0:
                work, tok = _batch(prefilled[v], batch)
                with PeakRSS() as mem:
                    _decode(model, work, tok, decode_tokens, v)
                held, peak = accounting.reserved_nbytes(work), mem.delta
                del work
                if held <= limit:
                    break
                batch, held, peak = batch - 1, 0, 0
            rows[v] = {"batch": int(batch), "per_sequence_bytes": one[v], "fits": batch > 0, "cache_bytes": held,
                       "decode_peak_rss_delta": peak, "decode_tokens_per_second": 0.0}
            if batch:
                ready[v] = _batch(prefilled[v], batch)
        steps = _interleaved(ready, _step_as(model), decode_tokens, repeats)
        for v in ready:
            rows[v]["decode_tokens_per_second"] = rows[v]["batch"] / statistics.median(steps[v])
        ratio = {}
        for v in variants:
            if v not in steps or FULL not in steps:
                ratio[v] = 0.0 if FULL in steps else None
                continue
            b, bf = rows[v]["batch"], rows[FULL]["batch"]
            ratio[v] = statistics.median((b / sv) / (bf / sf) for sv, sf in zip(steps[v], steps[FULL], strict=True))
        results.append({"context": int(ids.shape[1]), "budget_bytes": limit,
                        "budget": f"{value:g}x full" if kind == "full" else f"{limit} bytes",
                        "variants": rows, "budget_throughput_vs_full": ratio})
    return {"context": int(ids.shape[1]), "decode_tokens": decode_tokens, "budgets": results}


@torch.no_grad()
def dtype_context(models: dict, ids: torch.Tensor, decode_tokens: int, repeats: int, chunk: int = PREFILL_CHUNK) -> dict:
    """transformers' default cache with the same model in two dtypes (``{"bfloat16": m1, "float32": m2}``): prefill
    seconds and decode tokens/s, decode steps interleaved as in :func:`bench_context`; ``decode_ratio`` is the
    first dtype's decode speed over the second's (median of per-step ratios), ``prefill_ratio`` likewise."""
    names = list(models)
    out, prefilled = {}, {}
    for name in names:
        model = models[name]
        with implementation(model, "sdpa"):
            cache = _new_cache(model, STOCK, None)
            t = time.perf_counter()
            logits = prefill(model, cache, ids, chunk_size=chunk)
            out[name] = {"prefill_seconds": time.perf_counter() - t}
        prefilled[name] = (cache, logits[:, None].argmax(-1))
    def step(name, cache, tok):
        with implementation(models[name], "sdpa"):
            return _step(models[name], cache, tok)

    steps = _interleaved(prefilled, step, decode_tokens, repeats)
    for n in names:
        out[n]["decode_tokens_per_second"] = 1.0 / statistics.median(steps[n])
    a, b = names
    return {"context": int(ids.shape[1]), "dtypes": out,
            "decode_ratio": statistics.median(sb / sa for sa, sb in zip(steps[a], steps[b], strict=True)),
            "prefill_ratio": out[b]["prefill_seconds"] / out[a]["prefill_seconds"]}


def _attention_for(model, variant: str):
    """Stock runs on transformers' own SDPA; echokv variants on the (output-identical) echokv attention."""
    return implementation(model, "sdpa") if variant == STOCK else echokv_attention(model)


def write(results: list[dict], meta: dict, out, budget: dict | None = None) -> list[Path]:
    """``bench.json`` (``meta``, the results of every context and, with ``budget``, the throughput at each KV
    budget), ``decode_speed.png`` and, with ``budget``, ``throughput_vs_budget.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    data = {"meta": meta, "contexts": results}
    if budget is not None:
        data["kv_budget"] = budget
    path.write_text(json.dumps(data, indent=2))
    written = [path]
    if results:
        written.append(_speed_plot(results, out))
    if budget is not None:
        written.append(_budget_plot(budget, out))
    return written


def _budget_plot(budget: dict, out: Path) -> Path:
    fig = plotting.figure((6.4, 4.2))
    ax = fig.add_subplot()
    rows = budget["budgets"]
    xs = [r["budget_bytes"] / 1e6 for r in rows]
    for v in BUDGET_VARIANTS:
        ys = [r["variants"][v]["decode_tokens_per_second"] for r in rows]
        ax.plot(xs, ys, marker="o", label=v)
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(f"b={r['variants'][v]['batch']}", (x, y), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
    ax.set_xlabel("KV-cache budget (MB)")
    ax.set_ylabel("decode tokens / s (summed over the batch)")
    ax.set_title(f"throughput at a KV budget, {budget['context']}-token prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    return plotting.save(fig, out / "throughput_vs_budget.png", dpi=120)


def _speed_plot(results: list[dict], out: Path) -> Path:
    fig = plotting.figure((6.4, 4.2))
    ax = fig.add_subplot()
    xs = [r["context"] for r in results]
    for v in VARIANTS:
        ax.plot(xs, [r["variants"][v]["decode_tokens_per_second"] for r in results], marker="o", label=v)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("decode speed vs context")
    ax.grid(alpha=0.3)
    ax.legend()
    return plotting.save(fig, out / "decode_speed.png", dpi=120)
