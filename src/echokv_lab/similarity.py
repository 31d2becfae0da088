"""Head-similarity analysis: how well one KV head is predicted from another, the picture behind EchoKV.

EchoKV drops KV heads from the cache and rebuilds them from retained heads of the same and
neighbouring layers. That only works if heads are (nearly) linear functions of each other, so before
compressing it is worth seeing where that redundancy is. For every ordered pair of KV heads (i, j)
over a range of full-attention layers this module measures

    R2[i, j] = 1 - residual([i], [j]) / energy([j])

the fraction of head j's energy that a ridge regression on head i alone explains (:mod:`echokv.stats.moments`):
for keys a RoPE-commuting per-frequency complex map on post-RoPE keys (energy = second moment, no bias: the
similarity the paper pictures; EchoKV itself rebuilds keys before RoPE with full maps), for values a full linear
map with bias (energy = variance). Rows of the matrix are sources (predictors), columns targets. With the ridge both
bounds hold exactly: 0 <= R2 <= 1, and the diagonal is 1 up to ridge shrinkage (at most 2.5e-4 below).

Sliding-window layers are left out: the cache keeps only a window of them and EchoKV never compresses
them. Everything streams through :func:`echokv.stats.collect.collect` into one :class:`KeyMoments` and one
:class:`ValueMoments` over all selected (layer, head) pairs (one group), so every cross-layer pair is seen on
the same tokens; the V covariance is (heads * head_dim)^2 float64, which bounds how many layers fit.

Entry points: :func:`head_similarity` (numbers, JSON-serialisable), :func:`plot_heatmaps` (PNGs) and
:func:`write_analysis` (both into a folder, as ``echokv analyze`` does).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from echokv import plotting
from echokv.models import KVGeometry, kv_geometry
from echokv.stats.collect import collect
from echokv.stats.moments import RIDGE, KeyMoments, ValueMoments
from echokv.util import atomic_dir

__all__ = [
    "MAX_COVARIANCE_BYTES",
    "check_size",
    "head_labels",
    "head_similarity",
    "key_r2",
    "parse_layers",
    "plot_heatmaps",
    "resolve_layers",
    "summarize",
    "value_r2",
    "write_analysis",
]

# One float64 V covariance over all analysed heads must stay below this; ValueMoments holds two such
# matrices (raw outer products and the cached covariance), so the real peak is about twice as much.
MAX_COVARIANCE_BYTES = 2 * 1024**3

JSON_NAME = "similarity.json"
PNG_NAMES = {"k": "similarity_k.png", "v": "similarity_v.png"}
_KIND_TITLE = {"k": "keys (post-RoPE, per-frequency complex map)", "v": "values (linear map with bias)"}
_LAYERS_HINT = "use e.g. 0-7, 5 or 0-3,8-11"


# -- layer selection -----------------------------------------------------------------------------
def parse_layers(spec: str, name: str = "--layers") -> list[int]:
    """Layer indices of a spec like ``"0-7"``, ``"5"`` or ``"0-3,8-11"`` (sorted, no duplicates).

    Only the format is checked here, so the CLI can reject a typo before spending time loading a model.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{name} is empty; {_LAYERS_HINT}")
    layers: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ValueError(f"{name} {spec!r} is not a layer range ({part.strip()!r} is not N or N-M); {_LAYERS_HINT}")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        if start > end:
            raise ValueError(f"{name} {spec!r}: the range {start}-{end} runs backwards; write {end}-{start}")
        layers.update(range(start, end + 1))
    return sorted(layers)


def resolve_layers(geo: KVGeometry, layers: list[int] | str | None = None, name: str = "--layers") -> list[int]:
    """The full-attention layers to analyse: all of them by default, else those named (sliding ones dropped).

    Raises ValueError for indices outside the model and for a selection with no full-attention layer, since
    silently analysing nothing (or a different range) would mislead.
    """
    full = geo.full_attention_layers
    if layers is None:
        if not full:
            raise ValueError("this model has no full-attention layer to analyse")
        return list(full)
    wanted = parse_layers(layers, name) if isinstance(layers, str) else sorted({int(i) for i in layers})
    if not wanted:
        raise ValueError(f"{name} names no layer; {_LAYERS_HINT}")
    bad = [i for i in wanted if not 0 <= i < geo.num_layers]
    if bad:
        raise ValueError(
            f"{name} names layer(s) {ranges(bad)} outside this model, which has {geo.num_layers} layers "
            f"(0-{geo.num_layers - 1})"
        )
    chosen = [i for i in wanted if i in set(full)]
    if not chosen:
        raise ValueError(
            f"{name} {ranges(wanted)} includes no full-attention layer: sliding-window layers are not analysed "
            f"(EchoKV leaves them uncompressed); this model's full-attention layers are {ranges(full)}"
        )
    return chosen


def ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5': short enough to put in an error message."""
    out, xs = [], sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def check_size(geo: KVGeometry, layers: list[int], name: str = "--layers") -> None:
    """Refuse selections whose V covariance would not fit comfortably in memory (see MAX_COVARIANCE_BYTES)."""
    dim = len(layers) * geo.num_kv_heads * geo.head_dim
    size = dim * dim * 8
    if size <= MAX_COVARIANCE_BYTES:
        return
    per_layer = geo.num_kv_heads * geo.head_dim
    fit = max(1, int(math.isqrt(MAX_COVARIANCE_BYTES // 8) // per_layer))
    first = layers[0]
    raise ValueError(
        f"analysing {len(layers)} layers x {geo.num_kv_heads} KV heads x head_dim {geo.head_dim} needs a "
        f"{dim}x{dim} float64 value covariance ({size / 1e9:.1f} GB, limit {MAX_COVARIANCE_BYTES / 1e9:.1f} GB); "
        f"pass {name} with at most {fit} full-attention layers, e.g. {name} {first}-{first + fit - 1}"
    )


# -- statistics ------------------------------------------------------------------------------------
def _r2(resid: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    # A head with no energy (never happens in trained models) is trivially "predicted": report 1, not NaN,
    # so the JSON stays standard. The upper clip only removes float rounding (resid >= 0 analytically).
    r2 = torch.where(energy[None, :] > 0, 1 - resid / energy.clamp_min(1e-300)[None, :], torch.ones_like(resid))
    return r2.clamp(max=1.0)


def key_r2(km: KeyMoments, ridge: float = RIDGE) -> torch.Tensor:
    """[n, n] R2 of head j (column) predicted from head i (row), all pairs at once.

    Same numbers as ``1 - km.residual([i], [j]) / km.energy([j])``: with one source the per-frequency
    normal equations are scalars, so the whole matrix is a few elementwise tensor operations instead of
    n^2 Python-level solves.
    """
    g = km.gram / max(km.count, 1)  # [F, n, n], g[f, a, b] = E[conj(z_a) z_b]
    diag = g.diagonal(dim1=1, dim2=2).real  # [F, n]
    energy = diag.sum(0)
    lam = ridge * diag.mean(0).clamp_min(1e-12)  # per source, as KeyMoments.solve
    c = g / (diag + lam)[:, :, None]  # c[f, i, j]: coefficient of source i for target j
    cross = (c.conj() * g).real.sum(0)
    quad = (c.abs() ** 2 * diag[:, :, None]).sum(0)
    return _r2(energy[None, :] - 2 * cross + quad, energy)


def value_r2(vm: ValueMoments, ridge: float = RIDGE) -> torch.Tensor:
    """[n, n] R2 of head j (column) predicted from head i (row) with a ridge linear map plus bias.

    Same numbers as ``1 - vm.residual([i], [j]) / vm.energy([j])``; one d x d solve per source serves every
    target at once (right-hand side [d, n*d]), so n solves instead of n^2.
    """
    cov, n, d = vm.cov, vm.n, vm.d
    energy = cov.diagonal().view(n, d).sum(1)
    resid = torch.empty(n, n, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(n):
        s = slice(i * d, (i + 1) * d)
        c_ss, c_st = cov[s, s], cov[s, :]
        lam = ridge * c_ss.diagonal().mean().clamp_min(1e-12)
        w = torch.linalg.solve(c_ss + lam * eye, c_st)  # [d, n*d]
        cross = (w * c_st).view(d, n, d).sum((0, 2))
        quad = (w * (c_ss @ w)).view(d, n, d).sum((0, 2))
        resid[i] = energy - 2 * cross + quad
    return _r2(resid, energy)


# -- summaries -------------------------------------------------------------------------------------
def _mean(x: torch.Tensor) -> float | None:
    return float(x.mean()) if x.numel() else None


def summarize(r2: torch.Tensor, layers: list[int], h: int) -> dict:
    """Per-layer and overall means, R2 by layer distance, and each head's best single source.

    Layer "distance" counts positions in ``layers`` (the analysed full-attention layers), so on a model with
    interleaved sliding-window layers "adjacent" means the neighbouring full-attention layer.
    """
    n_layers = len(layers)
    pos = torch.arange(n_layers).repeat_interleave(h)  # layer position of each head
    dist = (pos[:, None] - pos[None, :]).abs()
    off = ~torch.eye(len(pos), dtype=torch.bool)
    within = _mean(r2[(dist == 0) & off])
    adjacent = _mean(r2[dist == 1])
    by_distance = [_round(_mean(r2[(dist == k) & off])) for k in range(n_layers)]  # index = distance

    per_layer = []
    for p, layer in enumerate(layers):
        tgt = slice(p * h, (p + 1) * h)
        block = r2[tgt, tgt]
        row = {"layer": layer, "within": _round(_mean(block[~torch.eye(h, dtype=torch.bool)]))}
        # how well this layer's heads are predicted from the previous / next analysed layer's heads
        row["prev_layer"] = layers[p - 1] if p > 0 else None
        row["from_prev"] = _round(_mean(r2[(p - 1) * h : p * h, tgt])) if p > 0 else None
        row["next_layer"] = layers[p + 1] if p + 1 < n_layers else None
        row["from_next"] = _round(_mean(r2[(p + 1) * h : (p + 2) * h, tgt])) if p + 1 < n_layers else None
        per_layer.append(row)

    masked = r2.masked_fill(~off, float("-inf"))
    best_r2, best = masked.max(0)  # best source of each target (column)
    labels = head_labels(layers, h)
    best_source = [
        {
            "head": labels[j],
            "source": labels[int(best[j])] if len(labels) > 1 else None,
            "r2": _round(float(best_r2[j])) if len(labels) > 1 else None,
            "layer_offset": int(pos[int(best[j])] - pos[j]) if len(labels) > 1 else None,
        }
        for j in range(len(labels))
    ]
    return {
        "mean_within_layer": _round(within),
        "mean_adjacent_layer": _round(adjacent),
        "mean_by_layer_distance": by_distance,
        "per_layer": per_layer,
        "best_source": best_source,
    }


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def head_labels(layers: list[int], h: int) -> list[str]:
    return [f"L{layer}H{head}" for layer in layers for head in range(h)]


def head_similarity(model, blocks: torch.Tensor, layers: list[int] | str | None = None, progress: bool = True) -> dict:
    """R2 between every pair of KV heads of ``layers`` (default: all full-attention layers) on ``blocks`` [N, T].

    Returns a JSON-serialisable dict: ``layers``, ``num_kv_heads``, ``head_dim``, ``heads`` (labels
    ``"L{layer}H{head}"``, layer-major), ``r2_k`` and ``r2_v`` ([source][target] nested lists), ``summary``
    (``{"k": ..., "v": ...}``, see :func:`summarize`), ``tokens``, ``ridge`` and ``seconds``.
    """
    start = time.perf_counter()
    geo = kv_geometry(model)
    chosen = resolve_layers(geo, layers, name="layers")
    check_size(geo, chosen, name="layers")
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise ValueError(f"blocks must be a non-empty [N, T] tensor of token ids, got shape {tuple(blocks.shape)}")
    moments = collect(model, blocks, [chosen], desc="similarity statistics", progress=progress).moments
    km, vm = moments["k"][0], moments["v"][0]
    h = geo.num_kv_heads
    out = {
        "model": getattr(model, "echokv_name", None),
        "layers": chosen,
        "num_kv_heads": h,
        "head_dim": geo.head_dim,
        "heads": head_labels(chosen, h),
        "tokens": int(blocks.numel()),
        "ridge": RIDGE,
        "r2_layout": "r2[i][j]: head j (target) predicted from head i (source) alone",
    }
    for kind, r2 in (("k", key_r2(km)), ("v", value_r2(vm))):
        out[f"r2_{kind}"] = [[round(float(x), 6) for x in row] for row in r2]
        out.setdefault("summary", {})[kind] = summarize(r2, chosen, h)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


# -- plots -----------------------------------------------------------------------------------------
def _tick_step(n_layers: int, max_labels: int = 16) -> int:
    """Smallest of 1, 2, 5, 10, 20, ... that keeps at most ``max_labels`` layer labels on an axis."""
    for step in (1, 2, 5, 10, 20, 50, 100):
        if math.ceil(n_layers / step) <= max_labels:
            return step
    return math.ceil(n_layers / max_labels)


def plot_heatmaps(result: dict, out_dir: str | Path) -> list[Path]:
    """Write one heads x heads heatmap per kind (K, V) into ``out_dir``; returns the PNG paths.

    Rows are sources, columns targets (as in ``r2_k``/``r2_v``); white lines separate layers and the axes
    are labelled by layer, so blocks along the diagonal (same layer) and next to it (adjacent layers) are
    easy to compare.
    """
    import numpy as np

    out_dir = Path(out_dir)
    layers, h = result["layers"], result["num_kv_heads"]
    n = len(layers) * h
    step = _tick_step(len(layers))
    ticks = [p * h + (h - 1) / 2 for p in range(0, len(layers), step)]
    tick_labels = [f"L{layers[p]}" for p in range(0, len(layers), step)]
    model = result.get("model") or "model"
    paths = []
    for kind in ("k", "v"):
        r2 = np.asarray(result[f"r2_{kind}"], dtype=float)
        summ = result["summary"][kind]
        fig = plotting.figure((8.5, 7.5), dpi=130)
        ax = fig.add_subplot()
        im = ax.imshow(r2, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest", origin="upper")
        if h > 1:
            for b in range(1, len(layers)):
                ax.axhline(b * h - 0.5, color="white", linewidth=0.4, alpha=0.7)
                ax.axvline(b * h - 0.5, color="white", linewidth=0.4, alpha=0.7)
        ax.set_xticks(ticks, tick_labels, rotation=90 if len(tick_labels) > 10 else 0)
        ax.set_yticks(ticks, tick_labels)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlabel("target head (predicted), grouped by layer")
        ax.set_ylabel("source head (predictor), grouped by layer")

        def fmt(x):
            return "n/a" if x is None else f"{x:.3f}"

        ax.set_title(
            f"{model}: R2 of one KV head from another, {_KIND_TITLE[kind]}\n"
            f"{len(layers)} layers x {h} KV heads, {result.get('tokens', '?')} tokens; "
            f"mean within layer {fmt(summ['mean_within_layer'])}, adjacent layers {fmt(summ['mean_adjacent_layer'])}",
            fontsize=9,
        )
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cbar.set_label("R2 = 1 - residual / energy of target")
        paths.append(plotting.save(fig, out_dir / PNG_NAMES[kind]))
    return paths


# -- output folder -----------------------------------------------------------------------------------
def write_analysis(result: dict, out, overwrite: bool = False) -> list[Path]:
    """``similarity.json`` and the two heatmaps in the folder ``out``, written atomically
    (:func:`~echokv.util.atomic_dir`); returns the paths of the files."""
    out = Path(out).expanduser()
    with atomic_dir(out, overwrite) as tmp:
        (tmp / JSON_NAME).write_text(json.dumps(result, indent=1), encoding="utf-8")
        plot_heatmaps(result, tmp)
    return [out / JSON_NAME] + [out / name for name in PNG_NAMES.values()]
