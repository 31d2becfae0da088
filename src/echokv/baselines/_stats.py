"""Shared helpers of the baselines: calibration statistics of the cached K/V, RoPE undo/redo, ranks.

* :func:`group_moments` streams, over the calibration blocks, the mean and covariance of the
  concatenated K (post-RoPE, as cached, and pre-RoPE) and V features of groups of layers
  (``[[l] for l in layers]``: per layer). The result is kept in ``Calibration.cache`` so every method
  and ratio of one run shares one capture pass per grouping.
* :class:`Rope` gives the cos/sin the model uses at given positions for a given layer, so post-RoPE
  keys can be rotated back (``unrotate``) and forward again (``rotate``). The rotation is undone
  exactly (division by cos^2 + sin^2, so RoPE variants with an attention scaling are handled too).
* :func:`allocate_ranks` splits a latent budget between several PCA bases.
"""

from __future__ import annotations

import inspect

import torch

from ..capture import capture
from ..models import kv_geometry, text_config
from ..moments import ValueMoments
from .base import Calibration, MethodUnavailable


# -- RoPE -----------------------------------------------------------------------------------------
def rotary_module(model):
    """The model's rotary embedding module (the one its decoder layers get cos/sin from), or None."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return getattr(base, "rotary_emb", None)


class Rope:
    """cos/sin of the model's RoPE for one layer, at any positions, in float32.

    A table for positions [0, n) is computed on demand and grown by doubling, so a decode step that
    rebuilds every layer computes it once. The table depends on positions only (like the model's own
    rotary buffers); it is not part of the KV cache.
    """

    def __init__(self, model, layer: int):
        self.module = rotary_module(model)
        if self.module is None:
            raise MethodUnavailable(
                f"{type(model).__name__} has no rotary embedding module (model.model.rotary_emb) to undo RoPE "
                "with; use the post-RoPE variant (keys='post_rope')"
            )
        self.kwargs = {}
        if "layer_type" in inspect.signature(self.module.forward).parameters:
            types = getattr(text_config(model), "layer_types", None)
            self.kwargs["layer_type"] = types[layer] if types else "full_attention"
        self._cos = self._sin = None

    def table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, d] (float32) of positions 0..n-1."""
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != torch.device(device):
            size = max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 64)
            pos = torch.arange(size, device=device)[None]
            x = torch.zeros(1, dtype=torch.float32, device=device)
            with torch.no_grad():
                cos, sin = self.module(x, pos, **self.kwargs)
            self._cos, self._sin = cos[0].float(), sin[0].float()
        return self._cos[:n], self._sin[:n]

    def at(self, start: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(start + n, device)
        return cos[start:], sin[start:]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: k [..., T, d] pre-RoPE, cos/sin [T, d] -> post-RoPE (float32)."""
    k = k.float()
    return k * cos + _rotate_half(k) * sin


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: k [..., T, d] post-RoPE -> pre-RoPE (float32); the exact inverse of :func:`rotate`."""
    k = k.float()
    return (k * cos - _rotate_half(k) * sin) / (cos * cos + sin * sin)


# -- calibration moments --------------------------------------------------------------------------
def require_calibration(calibration, who: str) -> Calibration:
    if calibration is None or getattr(calibration, "blocks", None) is None or len(calibration.blocks) == 0:
        raise ValueError(f"{who} needs calibration data (Calibration(blocks=[N, T] token ids)) in prepare()")
    return calibration


CAPTURE_BLOCK = 4  # layers per group of one capture pass, when the requested groups fit in such blocks


def group_moments(model, calibration: Calibration, groups: list[list[int]], progress: bool = True) -> dict:
    """Mean/covariance of the K and V features of each group of layers, over the calibration blocks.

    Returns ``{"k_post": [...], "k_pre": [...] or None, "v": [...]}``, one
    :class:`~echokv.moments.ValueMoments` per group whose features are the group's layers (in order),
    then KV heads, then channels. ``k_post`` are the keys as the cache holds them (after RoPE);
    ``k_pre`` the same keys with RoPE undone (calibration blocks start at position 0), or None when
    the model has no rotary module.

    Results live in ``calibration.cache``; a request whose groups each lie inside a group already
    captured is answered by slicing, without running the model again. A pass captures blocks of
    ``CAPTURE_BLOCK`` adjacent full-attention layers whenever the requested groups fit in them, so
    per-layer statistics (lowrank, headdrop) and cross-layer ones (xlayer-svd, up to 4 layers) share
    one pass.
    """
    groups = [list(g) for g in groups]
    found = _from_cache(model, calibration, groups)
    if found is not None:
        return found
    layers = kv_geometry(model).full_attention_layers
    blocks = [layers[i : i + CAPTURE_BLOCK] for i in range(0, len(layers), CAPTURE_BLOCK)]
    fits = all(any(set(g) <= set(b) for b in blocks) for g in groups)
    _capture_moments(model, calibration, blocks if fits else groups, progress)
    return _from_cache(model, calibration, groups)


def _from_cache(model, calibration, groups):
    for key, val in calibration.cache.items():
        if not (isinstance(key, tuple) and key[:2] == ("baselines.group_moments", id(model))):
            continue
        have = [list(g) for g in key[2]]
        where = []
        for g in groups:
            host = next((i for i, b in enumerate(have) if set(g) <= set(b)), None)
            if host is None:
                break
            where.append(host)
        else:
            return {kind: None if val[kind] is None else [
                _sub(val[kind][host], have[host], g) for g, host in zip(groups, where)] for kind in val}
    return None


def _sub(mom: ValueMoments, have: list[int], want: list[int]) -> ValueMoments:
    """The moments of the layers ``want`` (a subset of ``have``, in ``want``'s order)."""
    if want == have:
        return mom
    h = mom.n // len(have)
    width = h * mom.d
    idx = torch.cat([torch.arange(have.index(lay) * width, (have.index(lay) + 1) * width) for lay in want])
    out = ValueMoments(len(want) * h, mom.d)
    out.count, out.total, out.outer = mom.count, mom.total[idx], mom.outer[idx][:, idx]
    return out


def _capture_moments(model, calibration, groups, progress) -> None:
    key = ("baselines.group_moments", id(model), tuple(tuple(g) for g in groups))
    geo = kv_geometry(model)
    h, d = geo.num_kv_heads, geo.head_dim
    try:
        ropes = {layer: Rope(model, layer) for g in groups for layer in g}
    except MethodUnavailable:
        ropes = None
    out = {
        "k_post": [ValueMoments(len(g) * h, d) for g in groups],
        "k_pre": [ValueMoments(len(g) * h, d) for g in groups] if ropes else None,
        "v": [ValueMoments(len(g) * h, d) for g in groups],
    }
    group_of = {layer: gi for gi, g in enumerate(groups) for layer in g}
    pending: dict[int, dict[int, tuple]] = {}

    def rows(xs):  # list of [B, H, T, d] (one per layer) -> [B*T, S*H, d]
        x = torch.cat(xs, dim=1)
        return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], d)

    def on_layer(layer, module, q, k, v):
        gi = group_of[layer]
        buf = pending.setdefault(gi, {})
        buf[layer] = (k, v)
        if len(buf) < len(groups[gi]):
            return
        pending.pop(gi)
        ks = [buf[lay][0] for lay in groups[gi]]
        out["k_post"][gi].add(rows(ks))
        out["v"][gi].add(rows([buf[lay][1] for lay in groups[gi]]))
        if ropes:
            t = ks[0].shape[2]
            pre = []
            for lay, kk in zip(groups[gi], ks):
                cos, sin = ropes[lay].table(t, kk.device)
                pre.append(unrotate(kk, cos, sin))
            out["k_pre"][gi].add(rows(pre))

    capture(model, calibration.blocks, on_layer, layers=sorted(group_of), desc="baseline statistics", progress=progress)
    calibration.cache[key] = out


def pca(moments: ValueMoments, index: torch.Tensor | None = None, center: bool = True):
    """Principal axes of (a sub-block ``index`` of) the features.

    Returns (eigenvalues desc, basis [D, D], mean [D], energy): ``energy`` is E||x||^2 (uncentred), the
    scale errors are measured against. ``center=False`` uses the uncentred second moment (an SVD of
    the raw vectors, as Palu/xKV do) and a zero mean.
    """
    mu = moments.total / max(moments.count, 1)
    second = moments.outer / max(moments.count, 1)
    if index is not None:
        mu, second = mu[index], second[index][:, index]
    mat = second - torch.outer(mu, mu) if center else second
    evals, evecs = torch.linalg.eigh(mat)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    return evals, evecs, (mu if center else torch.zeros_like(mu)), float(second.trace())


# -- rank allocation ------------------------------------------------------------------------------
ALLOCATIONS = ("greedy", "uniform")


def allocate_ranks(spectra: list[torch.Tensor], kept: float, mode: str = "greedy",
                   scales: list[float] | None = None) -> list[int]:
    """Ranks for several bases (eigenvalues ``spectra``, descending) keeping a ``kept`` share of all dims.

    ``greedy``: exactly ``round(kept * total dims)`` latent dims, given one at a time to the basis whose
    next component removes the most *relative* squared error, its eigenvalue over the basis's scale
    (``scales``, default the eigenvalue sum): this minimises the sum over bases of the error relative
    to the scale (a calibration-only proxy of Palu's Fisher-information rank search).
    ``uniform``: every basis keeps ``round(kept * its dims)``.
    """
    if mode not in ALLOCATIONS:
        raise ValueError(f"unknown rank allocation {mode!r}; choose one of {', '.join(ALLOCATIONS)}")
    dims = [len(s) for s in spectra]
    if mode == "uniform":
        return [min(n, round(kept * n)) for n in dims]
    budget = min(sum(dims), round(kept * sum(dims)))
    scores = []
    for i, s in enumerate(spectra):
        s = s.double()
        scale = float(s.sum()) if scales is None else scales[i]
        rel = s / max(scale, 1e-30)
        # tiny decreasing tie-breaker keeps each basis's components in order when eigenvalues vanish
        rel = rel + 1e-18 * (len(s) - torch.arange(len(s), dtype=torch.float64))
        scores += [(float(r), i) for r in rel]
    scores.sort(key=lambda x: -x[0])
    ranks = [0] * len(spectra)
    for _, i in scores[:budget]:
        ranks[i] += 1
    return ranks
