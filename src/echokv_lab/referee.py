"""The referee's analyses of a trained artifact (``echokv analyze --artifact DIR``): where its rebuilt cache errs.

* (a) per layer and KV head, the held-out error of the rebuilt keys (before RoPE) and values (heatmaps);
* (b) whether the head and component relations hold across documents: the artifact, fitted on the calibration
  text, measured on texts of other kinds (prose of the evaluation split, technical prose, C code, the user's
  ``--text``), with the mean and spread over them;
* (c) sensitivity to context length: the K, V and attention-output errors along one long sequence of the
  evaluation text, per token position (up to the model's context, at most :data:`LONG_TOKENS`).

The fourth analysis, how errors propagate through the model (per-layer output error, last hidden state, KL of
the next-token distributions, every method at equal memory), is ``echokv eval --suite fidelity``.

Every error is relative: the squared error summed over what is compared, over the sum of squares of the
original (``1 - R^2`` about zero). The components are quantized as the cache stores them. Every variant (mix, heads,
hybrid) can be analysed.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from dataclasses import fields
from pathlib import Path

import torch

#: blocks of ``seq_len`` tokens per text source (b)
SOURCE_BLOCKS = 4
#: the longest sequence of (c)
LONG_TOKENS = 8192
#: query positions scored per sequence for the attention-output error
QUERIES = 128
JSON_NAME, MD_NAME = "artifact_analysis.json", "artifact_analysis.md"
PNG_HEADS, PNG_SOURCES, PNG_POSITION = "error_per_head.png", "error_per_source.png", "error_by_position.png"


def _blocks(tokenizer, text: str, seq_len: int, n: int) -> torch.Tensor | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(n, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len) if n else None


def text_sources(tokenizer, training: dict, seq_len: int, paths=None) -> dict[str, torch.Tensor]:
    """The texts of (b), ``name -> blocks``: the calibration text's held-out blocks (as training chose them), the
    evaluation split, and the reports' haystacks (technical prose, code; with ``paths`` the user's text)."""
    from echokv.config import TrainConfig
    from echokv.data import haystack_sources, token_blocks
    from echokv.training import spread_blocks

    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in training.items() if k in known and k not in ("text_paths", "keys")}, progress=False)
    out = {"calibration text, held-out blocks (prose and docs)": spread_blocks(tokenizer, cfg)[1][:SOURCE_BLOCKS]}
    out["evaluation text (prose)"] = token_blocks(tokenizer, "evaluation", SOURCE_BLOCKS * seq_len, seq_len)
    for src in haystack_sources("test", paths):
        if src["kind"].startswith("prose"):  # the evaluation text's novel is already there
            continue
        blocks = _blocks(tokenizer, src["text"], seq_len, SOURCE_BLOCKS)
        if blocks is not None:
            out[f"{src['name']} ({src['kind']})"] = blocks
    return out


def measure(model, mixes, blocks: torch.Tensor, seed: int = 0, from_start: bool = False) -> dict:
    """:meth:`echokv.training.Features.details` of ``blocks`` with the artifact's network."""
    from echokv.stats.capture import attention_modules
    from echokv.stats.collect import collect
    from echokv.training import Features

    groups = mixes.layout.groups
    cal = collect(model, blocks, groups, features=(), keep_samples=len(blocks), desc="capture", progress=False)
    feats = Features(model, cal.samples, groups, attention_modules(model), QUERIES, seed, from_start=from_start)
    feats.encode(mixes)
    return feats.details(mixes)


def _mean(rows: list[list[float]]) -> float:
    return statistics.fmean(x for row in rows for x in row)


def analyze(model, tokenizer, artifact_path, seq_len: int = 512, paths=None, long_tokens: int = LONG_TOKENS,
            progress: bool = True) -> dict:
    """(a), (b) and (c) for the artifact at ``artifact_path`` (see the module docstring); returns the result."""
    from tqdm.auto import tqdm

    from echokv import artifact as art
    from echokv.data import available_tokens, token_blocks
    from echokv.models import kv_geometry

    config = art.read_config(artifact_path)  # (an artifact of a retired form is refused here, in one line)
    mixes = art.load(artifact_path, model)
    t0 = time.perf_counter()
    sources = text_sources(tokenizer, config.get("training", {}), seq_len, paths)
    geo = kv_geometry(model)
    longest = min(long_tokens, geo.max_context or long_tokens, available_tokens(tokenizer, "evaluation"))
    per_source = {}
    for name, blocks in tqdm(sources.items(), desc="texts", disable=not progress):
        per_source[name] = measure(model, mixes, blocks)
    first = next(iter(per_source.values()))
    long = measure(model, mixes, token_blocks(tokenizer, "evaluation", longest, longest), from_start=True)
    summary = {}
    for key in ("k", "v", "output"):
        values = [_mean(r[key]) if key != "output" else statistics.fmean(r[key]) for r in per_source.values()]
        summary[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                        "spread": statistics.pstdev(values)}
    return {
        "artifact": str(artifact_path), "variant": art.config_variant(config),
        "kept_fraction": config["layout"].get("kept_fraction"), "model": getattr(model, "echokv_name", None),
        "seq_len": seq_len, "tokens_per_source": {n: int(b.numel()) for n, b in sources.items()},
        "per_head": {"source": next(iter(per_source)), "layers": first["layers"], "k": first["k"], "v": first["v"],
                     "output": first["output"]},
        "per_source": {n: {"k": _mean(r["k"]), "v": _mean(r["v"]), "output": statistics.fmean(r["output"])}
                       for n, r in per_source.items()},
        "across_sources": summary,
        "by_position": {"tokens": longest, "positions": long["positions"], **long["by_position"]},
        "seconds": time.perf_counter() - t0,
    }


def _bucketed(values: list[float], positions: list[int] | None, buckets: int) -> tuple[list[float], list[float]]:
    x = torch.tensor(positions if positions is not None else range(len(values)), dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    edges = torch.linspace(0, float(x.max()) + 1, buckets + 1)
    centres, means = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (x >= lo) & (x < hi)
        if sel.any():
            centres.append(float((lo + hi) / 2))
            means.append(float(y[sel].mean()))
    return centres, means


def write(result: dict, out_dir: Path, overwrite: bool = False) -> list[Path]:
    """``artifact_analysis.json``, three figures and ``artifact_analysis.md``, written atomically."""
    from echokv import plotting
    from echokv.util import atomic_dir

    out_dir = Path(out_dir).expanduser()
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
        ph = result["per_head"]
        fig = plotting.figure((8, 6))
        for i, kind in enumerate(("k", "v")):
            ax = fig.add_subplot(1, 2, i + 1)
            im = ax.imshow(torch.tensor(ph[kind]).numpy(), aspect="auto", cmap="magma")
            ax.set_title(f"{kind.upper()}: relative error")
            ax.set_xlabel("KV head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax)
        plotting.save(fig, tmp / PNG_HEADS)
        fig = plotting.figure((9, 4))
        ax = fig.add_subplot(1, 1, 1)
        names = list(result["per_source"])
        for j, key in enumerate(("k", "v", "output")):
            ax.bar([i + 0.27 * (j - 1) for i in range(len(names))], [result["per_source"][n][key] for n in names],
                   width=0.27, label=key if key == "output" else key.upper())
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=15, fontsize=8)
        ax.set_ylabel("relative error")
        ax.legend()
        plotting.save(fig, tmp / PNG_SOURCES)
        bp = result["by_position"]
        fig = plotting.figure((7, 4))
        ax = fig.add_subplot(1, 1, 1)
        for key, pos in (("k", None), ("v", None), ("output", bp["positions"])):
            ax.plot(*_bucketed(bp[key], pos, 32), marker=".", label=key if key == "output" else key.upper())
        ax.set_xlabel("token position")
        ax.set_ylabel("relative error")
        ax.set_yscale("log")
        ax.legend()
        plotting.save(fig, tmp / PNG_POSITION)
        (tmp / MD_NAME).write_text(markdown(result))
    return [out_dir / n for n in (JSON_NAME, PNG_HEADS, PNG_SOURCES, PNG_POSITION, MD_NAME)]


def markdown(result: dict) -> str:
    """The short report section: the three analyses in numbers."""
    ph, ac, bp = result["per_head"], result["across_sources"], result["by_position"]
    worst = max(((layer, h, kind, row[h]) for kind in ("k", "v") for layer, row in zip(ph["layers"], ph[kind],
                 strict=True) for h in range(len(row))), key=lambda t: t[3])
    lines = [f"# EchoKV artifact analysis: {Path(result['artifact']).name}", "",
             (f"{result['variant']} artifact, kept fraction {result['kept_fraction']:.4f}, model {result['model']}. "
             "Relative errors (squared error over the sum of squares), components quantized as the cache stores "
             "them."), "",
             f"## (a) Per layer and KV head ({ph['source']})", "",
             (f"Mean K error {_mean(ph['k']):.4g}, V {_mean(ph['v']):.4g}, attention output "
             f"{statistics.fmean(ph['output']):.4g}; the worst head is layer {worst[0]} head {worst[1]} "
             f"({worst[2].upper()}, {worst[3]:.4g}). ![per head]({PNG_HEADS})"), "",
             "## (b) Across documents", "", "| text | K | V | attention output |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['k']:.4g} | {r['v']:.4g} | {r['output']:.4g} |" for n, r in result["per_source"].items()]
    lines += ["", "Mean (spread = standard deviation over the texts): " + ", ".join(
        f"{k if k == 'output' else k.upper()} {v['mean']:.4g} ({v['spread']:.2g}, {v['min']:.4g}-{v['max']:.4g})"
        for k, v in ac.items()) + f". ![per text]({PNG_SOURCES})", "",
        f"## (c) Against token position (one sequence of {bp['tokens']} tokens)", ""]
    quarter = max(1, bp["tokens"] // 4)
    rows = []
    for key in ("k", "v"):
        vals = bp[key]
        rows.append(f"{key.upper()} " + ", ".join(f"{statistics.fmean(vals[i:i + quarter]):.4g}"
                                                  for i in range(0, len(vals), quarter)))
    pos, out = bp["positions"], bp["output"]
    rows.append("output " + ", ".join(
        f"{statistics.fmean([o for p, o in zip(pos, out, strict=True) if i <= p < i + quarter] or [float('nan')]):.4g}"
        for i in range(0, bp["tokens"], quarter)))
    lines += ["Mean error per quarter of the sequence: " + "; ".join(rows) + f". ![by position]({PNG_POSITION})",
              "", "(d) Error propagation: `echokv eval --suite fidelity`.", ""]
    return "\n".join(lines)
