"""Low-rank projection of the cached K/V onto calibration PCA bases (Palu-like).

Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection", arXiv 2407.21118)
factorises the K and V projection weights, ``W = A B``, caches the rank-r latent ``h = x A`` instead of
the K/V, and reconstructs ``h B`` on the fly (keys pre-RoPE, RoPE re-applied after reconstruction).
Heads are decomposed alone (M-LRD), all together (J-LRD) or in groups (G-LRD); ranks are allocated
per layer by a Fisher-information search.

Here the model weights are untouched: per layer (and per group of KV heads), K and V are projected
onto the top-r principal axes of the calibration K/V, the r-dim latent is stored, and the transpose
reconstructs. Since K = x W_k is linear in the layer input x, the rank-r PCA of K is the best rank-r
latent computable from x in the calibration MSE, i.e. at least as accurate there as Palu's
(whitened) weight SVD with the same rank.

Parameters
    keys: ``"pre_rope"`` (default, as Palu): the cached post-RoPE keys are rotated back to pre-RoPE with
        the model's own cos/sin, projected, and RoPE is re-applied after reconstruction. Exact under
        the assumption that the cache's token i sits at position i (batch of one or right padding,
        position ids 0..T-1 in cache order; what :class:`~echokv_lab.methods.base.Method` does). Keys of
        calibration blocks are rotated back with positions 0..T-1 likewise. ``"post_rope"``: PCA of
        the cached keys as they are (position-free but weaker: RoPE smears the spectrum).
    head_group: KV heads per latent (``None``: all heads of a layer share one latent, Palu's J-LRD,
        the most accurate; 1: per-head M-LRD; other divisors of the head count: G-LRD).
    allocation: ``"greedy"`` (default): the ``round((1 - ratio) * 2*L*H*d)`` latent dims of the model
        go, one at a time, to the basis (layer x K/V x head group) whose next component removes the
        most error relative to the basis's scale (a calibration-only proxy of Palu's Fisher rank
        search); ``"uniform"``: every basis keeps ``round((1 - ratio) * its dims)``.
    norm: the scale of the greedy allocation: ``"energy"`` (default, E||x||^2) or ``"variance"``
        (the centred variance).
    center: subtract the calibration mean before projecting and add it back (an affine latent; one
        extra vector per basis). Default False here (Palu has no bias).

Defaults were picked on SmolLM2-135M (perplexity of 1024 evaluation tokens, calibration 8192 tokens;
full cache 34.8). At ratio 0.5 / 0.75: default 39.4 / 40.6; ``center=True`` 41.7 / 55.5 (the
attention-sink token at position 0, far from the mean, is rebuilt badly by a centred basis);
``norm="variance"`` with centring 47.5 / 62.6; ``allocation="uniform"`` (centred) 56.7 / 72.8;
``keys="post_rope"`` (centred, variance) 49.5 / 62.1 against 47.5 / 62.6 pre-RoPE; per-head
latents (``head_group=1``, centred) 53.8 / 59.0.

Memory: per token the cache stores ``sum r`` latent numbers (the cache's dtype) instead of 2*L*H*d;
the kept fraction is ``sum r / (2*L*H*d)`` (:attr:`achieved_kept_fraction`), within one latent dim
of 1 - ratio (:attr:`kept_step` is one dim: 1 / (2*L*H*d), e.g. 1/11520 on SmolLM2-135M). Bases (and
means when centred) are method parameters (float32), reported as :meth:`parameter_bytes` apart from
the cache, like EchoKV's network.

Simplified vs Palu: no weight factorisation or fused kernels (the latent is computed from the
cached K/V, which is the same thing up to the better basis), no quantisation of the latent, and
the rank search is the energy proxy above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from echokv.codecs.projection import Basis, ProjectionCodec
from echokv.models import kv_geometry
from echokv.selection import make_groups
from echokv.stats.rope import RopeUnavailable
from echokv_lab.methods.base import Method, MethodUnavailable, register, require_calibration

KEY_SPACES = ("pre_rope", "post_rope")
NORMS = ("energy", "variance")
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


def fit_bases(moments: dict, groups: list[list[int]], h: int, d: int, head_group: int, keys: str,
              kept: float, allocation: str, center: bool, norm: str = "energy") -> list[Basis]:
    """PCA bases per (group of layers, K/V, head group) with ranks allocated for ``kept``."""
    if keys not in KEY_SPACES:
        raise ValueError(f"unknown key space {keys!r}; choose one of {', '.join(KEY_SPACES)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown rank allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if keys == "pre_rope" and moments["k_pre"] is None:
        raise ValueError("this model has no rotary embedding module to undo RoPE with; use keys='post_rope'")
    head_sets = [list(range(s, s + head_group)) for s in range(0, h, head_group)]
    cands = []
    for gi, group in enumerate(groups):
        for kind in ("k", "v"):
            mom = moments[("k_pre" if keys == "pre_rope" else "k_post") if kind == "k" else "v"][gi]
            for heads in head_sets:
                idx = torch.cat([torch.arange((j * h + hh) * d, (j * h + hh + 1) * d)
                                 for j in range(len(group)) for hh in heads])
                evals, evecs, mu, energy = mom.pca(idx, center=center)
                cands.append((kind, group, heads, evals, evecs, mu, energy))
    scales = [c[6] for c in cands] if norm == "energy" else None
    ranks = allocate_ranks([c[3] for c in cands], kept, allocation, scales)
    return [
        Basis(kind, list(group), heads, mu.float(), evecs[:, :r].float().contiguous(), name=f"{kind}{i}")
        for i, ((kind, group, heads, _, evecs, mu, _), r) in enumerate(zip(cands, ranks))
    ]


@dataclass
class LowRankMethod(Method):
    """Palu-like per-layer low-rank K/V projection (see the module docstring)."""

    name: str = "lowrank"
    keys: str = "pre_rope"
    head_group: int | None = None
    allocation: str = "greedy"
    center: bool = False
    norm: str = "energy"
    bases: list = field(default_factory=list, repr=False)

    #: layers per shared latent (1 here; :class:`~echokv_lab.methods.xlayer_svd.CrossLayerSVDMethod` > 1)
    def layer_groups(self, layers: list[int]) -> list[list[int]]:
        return make_groups(layers, 1)

    def prepare(self, model, tokenizer, calibration) -> None:
        if self.keys not in KEY_SPACES:
            raise ValueError(f"unknown key space {self.keys!r}; choose one of {', '.join(KEY_SPACES)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown allocation scale {self.norm!r}; choose one of {', '.join(NORMS)}")
        geo = kv_geometry(model)
        h, d = geo.num_kv_heads, geo.head_dim
        hg = h if self.head_group is None else self.head_group
        if not isinstance(hg, int) or hg < 1 or h % hg:
            raise ValueError(f"head_group={self.head_group!r} must divide the {h} KV heads of this model")
        groups = self.layer_groups(geo.full_attention_layers)
        cal = require_calibration(calibration, self.name)
        moments = cal.group_moments(model, groups)
        self.bases = fit_bases(moments, groups, h, d, hg, self.keys, 1.0 - self.compression_ratio,
                               self.allocation, self.center, self.norm)

    def make_codec(self, model):
        if not self.bases:
            raise RuntimeError(f"{self.name}: call prepare(model, tokenizer, calibration) first")
        try:
            return ProjectionCodec(model, self.bases, self.keys)
        except RopeUnavailable as exc:
            raise MethodUnavailable(str(exc)) from exc

    # -- reporting --------------------------------------------------------------------------------
    @property
    def achieved_kept_fraction(self) -> float:
        """Stored latent dims over full K/V dims of the compressed layers (what the cache will measure)."""
        return sum(b.rank for b in self.bases) / max(sum(b.dims for b in self.bases), 1)

    @property
    def kept_step(self) -> float:
        """Change of the kept fraction per latent dim (the granularity of the achievable ratios)."""
        return 1.0 / max(sum(b.dims for b in self.bases), 1)

    def parameter_bytes(self) -> int:
        """Bytes of the bases and means (float32), held once for the model, not per token."""
        return sum(4 * b.num_parameters() for b in self.bases)

    def info(self) -> dict:
        return {
            **super().info(),
            "keys": self.keys,
            "allocation": self.allocation,
            "norm": self.norm,
            "center": self.center,
            "target_kept_fraction": 1.0 - self.compression_ratio,
            "kept_step": self.kept_step,
            "rank_k": sum(b.rank for b in self.bases if b.kind == "k"),
            "rank_v": sum(b.rank for b in self.bases if b.kind == "v"),
        }


register("lowrank")(LowRankMethod)
