"""The ``fidelity`` suite: how a method's errors propagate through the model, against the full cache.

Every method streams the same held-out sequences (the evaluation split, as perplexity) chunk by chunk through its
own cache, in lockstep with a full cache; after each chunk its cache is compressed, so every chunk after the first
attends to the compressed past (the tokens compared). On those tokens the suite measures:

* ``attn_error``: per decoder layer, the relative error of the attention block's output (after ``o_proj``),
  ``sum ||o - o_full||^2 / sum ||o_full||^2``; it includes the errors of every layer before it (propagation);
* ``hidden_error``: the same for the last layer's hidden state (``hidden_states[-1]``);
* ``kl``: the mean KL divergence ``KL(p_full || p_method)`` of the next-token distributions, in nats per token,
  with a 95 % bootstrap interval over the sequences (``ci_low`` / ``ci_high``). ``full`` compares the full cache
  with itself: every number is exactly 0.

Methods are compared at equal memory (the same compression ratio; the row carries the measured
``kept_fraction``). kvpress's presses compress a one-shot prefill only, so they have no streaming protocol here
(a ``skipped`` row).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from echokv.placement import input_device
from echokv_lab.eval.suites import FIDELITY


def _attention_modules(model) -> list:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")
    return [layer.self_attn for layer in layers]


class _Capture:
    """Attention-block outputs of the current forward call, one per layer."""

    def __init__(self, model):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(_attention_modules(model))]

    def _hook(self, i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.outputs[i] = out.detach()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _forward(model, cache, x, start, capture):
    from echokv.models import cache_kwarg

    capture.outputs = {}
    pos = torch.arange(start, start + x.shape[1], device=x.device)
    out = model(input_ids=x, use_cache=True, cache_position=pos, output_hidden_states=True,
                **cache_kwarg(model, cache))
    return out.logits.float(), out.hidden_states[-1].float(), {i: o.float() for i, o in capture.outputs.items()}


def streams(method) -> bool:
    """Whether a method runs the shared chunk-by-chunk protocol (its own ``generate`` / ``nll`` means not)."""
    from echokv_lab.methods.base import Method

    return type(method).nll is Method.nll and type(method).generate is Method.generate


@torch.no_grad()
def compare(model, method, ids: torch.Tensor, chunk: int) -> dict:
    """Stream ``ids`` [1, T] through ``method``'s cache and a full cache in lockstep; summed errors."""
    from echokv.attention import echokv_attention
    from echokv.cache import FullCache

    full_cache, cache = FullCache(model), method.new_cache(model)
    capture = _Capture(model)
    n_layers = len(capture.handles)
    attn_num, attn_den = [0.0] * n_layers, [0.0] * n_layers
    hid_num = hid_den = kl = 0.0
    tokens = 0
    try:
        with echokv_attention(model):
            for s in range(0, ids.shape[1], chunk):
                x = ids[:, s : s + chunk]
                ref_logits, ref_hidden, ref_attn = _forward(model, full_cache, x, s, capture)
                logits, hidden, attn = _forward(model, cache, x, s, capture)
                cache.compress()
                if s == 0:  # nothing compressed yet: the first chunk attends to itself exactly
                    continue
                for i in range(n_layers):
                    attn_num[i] += float((attn[i] - ref_attn[i]).pow(2).sum())
                    attn_den[i] += float(ref_attn[i].pow(2).sum())
                hid_num += float((hidden - ref_hidden).pow(2).sum())
                hid_den += float(ref_hidden.pow(2).sum())
                logp_ref = F.log_softmax(ref_logits, -1)
                logp = F.log_softmax(logits, -1)
                kl += float((logp_ref.exp() * (logp_ref - logp)).sum())
                tokens += x.shape[1]
    finally:
        capture.close()
    return {"attn_num": attn_num, "attn_den": attn_den, "hid_num": hid_num, "hid_den": hid_den, "kl": kl,
            "tokens": tokens, "report": cache.memory_report()}


def fidelity_row(model, method, blocks: torch.Tensor, chunk: int, progress: bool = False,
                 desc: str | None = None) -> dict:
    """One result row (no method fields) over every block: ``kl`` (with ``ci_low`` / ``ci_high``),
    ``hidden_error``, ``attn_error`` (per layer), ``tokens``, ``kept_fraction``, ``cache_bytes``, ``seconds``."""
    from tqdm.auto import tqdm

    from echokv_lab.eval.intervals import bootstrap_ratio
    from echokv_lab.methods import MethodUnavailable

    if not streams(method):
        raise MethodUnavailable(f"{method.name} has its own generation protocol (kvpress compresses a one-shot "
                                "prefill only): no streaming fidelity protocol")
    if blocks.shape[1] <= chunk:
        raise ValueError(f"fidelity needs sequences longer than one chunk ({chunk} tokens), got {blocks.shape[1]}")
    device = input_device(model)
    start = time.perf_counter()
    parts = [compare(model, method, b[None].to(device), chunk)
             for b in tqdm(blocks, desc=desc or "fidelity", disable=not progress, leave=False, unit="seq")]
    n_layers = len(parts[0]["attn_num"])
    attn = [sum(p["attn_num"][i] for p in parts) / max(sum(p["attn_den"][i] for p in parts), 1e-30)
            for i in range(n_layers)]
    tokens = sum(p["tokens"] for p in parts)
    kl = sum(p["kl"] for p in parts) / tokens
    low, high = bootstrap_ratio([p["kl"] for p in parts], [p["tokens"] for p in parts])
    kept = [float(p["report"]["kept_fraction"]) for p in parts]
    return {
        "task": FIDELITY,
        "context_length": int(blocks.shape[1]),
        "n": int(blocks.shape[0]),
        "sequences": int(blocks.shape[0]),
        "tokens": tokens,
        "kl": kl,
        "ci_low": low,
        "ci_high": high,
        "ci": "bootstrap95 of the mean KL over sequences",
        "hidden_error": sum(p["hid_num"] for p in parts) / max(sum(p["hid_den"] for p in parts), 1e-30),
        "attn_error": attn,
        "attn_error_mean": sum(attn) / len(attn),
        "sequence_kl": [p["kl"] for p in parts],
        "sequence_tokens": [p["tokens"] for p in parts],
        "kept_fraction": sum(kept) / len(kept),
        "cache_bytes": sum(float(p["report"]["cache_bytes"]) for p in parts) / len(parts),
        "seconds": time.perf_counter() - start,
    }


def fidelity_section(rows: list[dict], out: Path) -> tuple[str, list[Path]]:
    """Markdown (a table) and the per-layer figure of the fidelity rows."""
    from echokv import plotting

    fid = [r for r in rows if r.get("task") == FIDELITY]
    ok = [r for r in fid if not r.get("error") and not r.get("skipped")]
    intro = ("Tokens after the first chunk, which attend to the compressed past; relative errors are "
             "`sum ||x - x_full||^2 / sum ||x_full||^2`; KL is KL(full || method) of the next-token distribution "
             "in nats per token (95% bootstrap interval over sequences).")
    header = ("| method | compression | kept | KL (nats/token) | 95% interval | last hidden error | "
              "attention error (mean over layers) | worst layer |")
    lines = ["## Fidelity (error propagation against the full cache)", "", intro, "", header,
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(fid, key=lambda r: (r["method"] != "full", r["method"], r.get("compression_ratio", 0))):
        ratio = float(r.get("compression_ratio", 0.0))
        if r.get("error") or r.get("skipped"):
            text = " ".join(str(r.get("error") or r.get("skipped")).split()).replace("|", "\\|")[:120]
            lines.append(f"| {r['method']} | {ratio:g} | — | {text} | — | — | — | — |")
            continue
        worst = max(range(len(r["attn_error"])), key=lambda i: r["attn_error"][i])
        lines.append(f"| {r['method']} | {ratio:g} | {r['kept_fraction']:.3f} | {r['kl']:.4f} | "
                     f"{r['ci_low']:.4f}–{r['ci_high']:.4f} | {r['hidden_error']:.4f} | {r['attn_error_mean']:.4f} | "
                     f"{worst} ({r['attn_error'][worst]:.3f}) |")
    pngs = []
    if ok:
        fig = plotting.figure((6.5, 4))
        ax = fig.add_subplot()
        for r in ok:
            if r["method"] == "full":
                continue
            label = f"{r['method']}@{float(r.get('compression_ratio', 0)):g}"
            ax.plot(range(len(r["attn_error"])), r["attn_error"], marker=".", label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative attention-output error")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
        if len(ok) > 1:
            ax.legend(fontsize=7)
        pngs.append(plotting.save(fig, Path(out) / "fidelity_layers.png", dpi=120))
        lines += ["", "![attention-output error per layer](fidelity_layers.png)"]
    return "\n".join(lines) + "\n", pngs
