"""Perplexity of held-out text through each method's KV cache.

The text is the evaluation split of :mod:`echokv.data` (never seen by calibration or training), cut
into ``sequences`` blocks of ``seq_len`` tokens. Each block is streamed through a fresh cache of the
method in chunks of ``chunk`` tokens (:meth:`echokv_lab.methods.Method.nll`): a chunk attends to
its own tokens exactly and to everything before it through the cache as the method keeps it, so in
compressed mode every token after the first chunk is predicted from the compressed past (EchoKV:
rebuilt discarded heads). Perplexity is ``exp(total NLL / predicted tokens)`` over all blocks.

A perplexity row has the fields of every result row (:mod:`echokv_lab.eval.report`) with
``task = "perplexity"`` and ``score = 1 / perplexity`` (the geometric-mean probability of the next
token, in (0, 1], higher is better, so it sorts like the other scores), plus ``perplexity``,
``nll_per_token``, ``tokens`` and ``sequences``. The runner keeps these rows in ``results.json`` but
reports them in their own table (:func:`perplexity_table`) and figure (:func:`plot_perplexity`)
rather than among the task scores.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from echokv.placement import input_device
from echokv_lab.eval.suites import PERPLEXITY, PerplexitySpec


def heldout_blocks(tokenizer, spec: PerplexitySpec, paths=None) -> torch.Tensor:
    """``[sequences, seq_len]`` token ids from the start of the evaluation split."""
    from echokv.data import token_blocks

    return token_blocks(tokenizer, "evaluation", spec.sequences * spec.seq_len, spec.seq_len, paths)


def perplexity_row(model, method, blocks: torch.Tensor, chunk: int, progress: bool = False,
                   desc: str | None = None) -> dict:
    """Stream every block through ``method``'s cache and return one result row (no method fields).

    The row holds ``task``, ``context_length`` (the block length), ``score`` (1 / perplexity),
    ``perplexity``, ``nll_per_token``, ``tokens``, ``sequences``, ``n`` (= sequences), the measured
    ``kept_fraction`` and ``cache_bytes`` (means over blocks, at the end of each block) and
    ``seconds``; ``sequence_nll`` / ``sequence_tokens`` (per block) and ``ci_low`` / ``ci_high``, a 95 % bootstrap
    interval of the *perplexity* over the blocks (:func:`echokv_lab.eval.intervals.bootstrap_perplexity`).
    """
    from tqdm.auto import tqdm

    from echokv_lab.eval.intervals import bootstrap_perplexity

    device = input_device(model)
    total, count, kept, cache_bytes, seq_nll, seq_tokens = 0.0, 0, [], [], [], []
    start = time.perf_counter()
    for block in tqdm(blocks, desc=desc or "perplexity", disable=not progress, leave=False, unit="seq"):
        nll, n, report = method.nll(model, block[None].to(device), chunk_size=chunk)
        total += nll
        count += n
        seq_nll.append(float(nll))
        seq_tokens.append(int(n))
        kept.append(float(report["kept_fraction"]))
        cache_bytes.append(float(report["cache_bytes"]))
    if count == 0:
        raise ValueError("perplexity needs sequences of at least 2 tokens")
    nll_per_token = total / count
    ppl = math.exp(nll_per_token)
    low, high = bootstrap_perplexity(seq_nll, seq_tokens)
    return {
        "task": PERPLEXITY,
        "context_length": int(blocks.shape[1]),
        "score": 1.0 / ppl,
        "perplexity": ppl,
        "nll_per_token": nll_per_token,
        "tokens": count,
        "sequences": int(blocks.shape[0]),
        "n": int(blocks.shape[0]),
        "kept_fraction": sum(kept) / len(kept),
        "cache_bytes": sum(cache_bytes) / len(cache_bytes),
        "seconds": time.perf_counter() - start,
        "sequence_nll": seq_nll,
        "sequence_tokens": seq_tokens,
        "ci_low": low,
        "ci_high": high,
        "ci": "bootstrap95 of the perplexity over sequences",
    }


def perplexity_table(rows: list[dict]) -> list[str]:
    """Markdown lines: perplexity per method and ratio, and its change relative to ``full``."""
    ppl_rows = [r for r in rows if r.get("task") == PERPLEXITY]
    if not ppl_rows:
        return []
    full = next((r for r in ppl_rows if r["method"] == "full" and not r.get("error") and not r.get("skipped")), None)
    lines = [
        "| method | compression | kept | tokens | perplexity | 95% interval | vs full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(ppl_rows, key=lambda r: (r["method"] != "full", r["method"], r.get("compression_ratio", 0))):
        ratio = float(r.get("compression_ratio", 0.0))
        if r.get("error") or r.get("skipped"):
            message = " ".join(str(r.get("error") or r["skipped"]).split()).replace("|", "\\|")[:120]
            lines.append(f"| {r['method']} | {ratio:g} | — | — | {message} | — | — |")
            continue
        rel = f"{100 * (r['perplexity'] / full['perplexity'] - 1):+.1f}%" if full else "—"
        interval = f"{r['ci_low']:.2f}–{r['ci_high']:.2f}" if r.get("ci_low") is not None else "—"
        lines.append(f"| {r['method']} | {ratio:g} | {r['kept_fraction']:.3f} | {r['tokens']} | "
                     f"{r['perplexity']:.2f} | {interval} | {rel} |")
    return lines


def plot_perplexity(rows: list[dict], path) -> Path | None:
    """Perplexity against the measured kept KV fraction, one line per method (``full``: dashed line)."""
    from echokv import plotting

    ok = [r for r in rows if r.get("task") == PERPLEXITY and not r.get("error") and not r.get("skipped")]
    if not ok:
        return None
    fig = plotting.figure((6, 4))
    ax = fig.add_subplot()
    for method in sorted({r["method"] for r in ok if r["method"] != "full"}):
        points = sorted((r["kept_fraction"], r["perplexity"], r.get("ci_low"), r.get("ci_high"))
                        for r in ok if r["method"] == method)
        ys = [p[1] for p in points]
        err = [[max(0.0, p[1] - p[2]) if p[2] is not None else 0.0 for p in points],
               [max(0.0, p[3] - p[1]) if p[3] is not None else 0.0 for p in points]]
        ax.errorbar([p[0] for p in points], ys, yerr=err, marker="o", capsize=3, label=method)
    full = [r["perplexity"] for r in ok if r["method"] == "full"]
    if full:
        ax.axhline(full[0], color="black", linestyle="--", linewidth=1)
        ax.plot([1.0], [full[0]], marker="*", markersize=12, color="black", linestyle="none", label="full")
    ax.set_xlabel("kept KV fraction")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plotting.save(fig, path, dpi=120)
