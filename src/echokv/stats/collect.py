"""One pass of calibration text through the model into per-group statistics: the collector that training,
the baselines and the similarity analysis share.

:func:`collect` streams token blocks through :func:`~echokv.stats.capture.capture` into a
:class:`GroupCollector`. Per group of layers, a block's K/V are buffered until the group's last layer has run,
then added as one row per token (layers, then KV heads, then channels), so cross-layer statistics pair up the
same tokens. What is kept:

* ``features``, one moments object per group each (:data:`FEATURES`);
* ``keep_samples``: the Q/K/V of the first n blocks (stage 2 of training trains on them);
* ``means``: the per-head mean K and V of every layer (the mean-fill reference).

:class:`Calibration` is what methods learn from: token blocks, plus the statistics computed from them, shared by
every method and ratio of a run (:meth:`Calibration.group_moments`: one capture pass per grouping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import kv_geometry
from .capture import capture
from .moments import KeyMoments, ValueMoments
from .rope import Rope, RopeUnavailable, unrotate

#: what a feature is -> its statistic. ``k``: per-frequency complex Gram of post-RoPE keys (EchoKV's key maps,
#: head similarity); ``v``: mean/covariance of values; ``k_post`` / ``k_pre``: mean/covariance of the keys as
#: cached / with RoPE undone (the low-rank baselines; ``k_pre`` is None for a model without a rotary module).
FEATURES = {"k": KeyMoments, "v": ValueMoments, "k_post": ValueMoments, "k_pre": ValueMoments}

# Layers per group of the shared pass, when the requested groups fit in such blocks: per-layer statistics
# (lowrank, headdrop) and cross-layer ones (xlayer-svd, up to 4 layers) then come from one pass.
CAPTURE_BLOCK = 4


@dataclass
class CalibrationStats:
    """What one pass collected: ``moments[feature][g]``, ``samples[layer] = (q, k, v)`` stacked over the kept
    blocks, ``means[kind][layer]`` [H, d] and the number of tokens seen."""

    moments: dict
    samples: dict
    means: dict
    tokens: int

    def pool(self) -> CalibrationStats:
        """The moments and token count summed over data-parallel ranks (:mod:`echokv.distributed`); each rank
        keeps its own samples."""
        from .. import distributed

        for per_group in self.moments.values():
            for mom in per_group or []:
                mom.pool()
        local, self.tokens = self.tokens, distributed.sum_int(self.tokens)
        self.means = {kind: {layer: (distributed.all_sum(m.double() * local) / max(self.tokens, 1)).float()
                             for layer, m in per_layer.items()} for kind, per_layer in self.means.items()}
        return self


class GroupCollector:
    """The capture callback that accumulates :class:`CalibrationStats` (see the module docstring)."""

    def __init__(self, model, groups: list[list[int]], features=("k", "v"), keep_samples: int = 0,
                 means: bool = False):
        geo = kv_geometry(model)
        self.h, self.d = geo.num_kv_heads, geo.head_dim
        self.groups = [list(g) for g in groups]
        self.group_of = {layer: gi for gi, g in enumerate(self.groups) for layer in g}
        self.last = max(self.group_of)
        self.ropes = None
        if "k_pre" in features:
            try:
                self.ropes = {layer: Rope(model, layer) for layer in self.group_of}
            except RopeUnavailable:
                pass
        self.moments = {
            f: None if f == "k_pre" and self.ropes is None else [FEATURES[f](len(g) * self.h, self.d) for g in groups]
            for f in features
        }
        self.sums = {kind: {layer: torch.zeros(self.h, self.d, dtype=torch.float64) for layer in self.group_of}
                     for kind in ("k", "v")} if means else None
        self.keep_samples = keep_samples
        self.kept: dict[int, list] = {layer: [] for layer in self.group_of}
        self.pending: dict[int, dict[int, tuple]] = {}
        self.blocks = self.tokens = 0

    def layers(self) -> list[int]:
        return sorted(self.group_of)

    def __call__(self, layer, module, q, k, v) -> None:
        gi = self.group_of[layer]
        if self.sums is not None:
            for kind, x in (("k", k), ("v", v)):
                self.sums[kind][layer] += x.double().sum(dim=(0, 2)).cpu()
        buf = self.pending.setdefault(gi, {})
        buf[layer] = (k, v)
        if len(buf) == len(self.groups[gi]):  # every layer of the group seen for this block
            self.pending.pop(gi)
            self._add(gi, [buf[lay][0] for lay in self.groups[gi]], [buf[lay][1] for lay in self.groups[gi]])
        if self.blocks < self.keep_samples:
            # on the CPU, where training's stage 2 runs (a layer may run on any device of a split model)
            self.kept[layer].append(tuple(x.to("cpu", copy=True) for x in (q, k, v)))
        if layer == self.last:
            self.blocks += q.shape[0]
            self.tokens += q.shape[0] * q.shape[2]

    def _rows(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Per layer [B, H, T, d] -> [B*T, layers*H, d]."""
        x = torch.cat(xs, dim=1)
        return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], self.d)

    def _add(self, gi: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        rows = {}
        for feature, per_group in self.moments.items():
            if per_group is None:
                continue
            if feature == "k_pre":
                pre = []
                for layer, k in zip(self.groups[gi], ks):
                    cos, sin = self.ropes[layer].table(k.shape[2], k.device)  # blocks start at position 0
                    pre.append(unrotate(k, cos, sin))
                per_group[gi].add(self._rows(pre))
                continue
            source = "v" if feature == "v" else "k"
            if source not in rows:
                rows[source] = self._rows(vs if source == "v" else ks)
            per_group[gi].add(rows[source])

    def stats(self) -> CalibrationStats:
        samples = {layer: tuple(torch.cat([x[i] for x in xs], dim=0) for i in range(3))
                   for layer, xs in self.kept.items() if xs}
        n = max(self.tokens, 1)
        means = {} if self.sums is None else {
            kind: {layer: (s / n).float() for layer, s in sums.items()} for kind, sums in self.sums.items()}
        return CalibrationStats(self.moments, samples, means, self.tokens)


def collect(model, blocks: torch.Tensor, groups: list[list[int]], features=("k", "v"), keep_samples: int = 0,
            means: bool = False, desc: str = "capture", progress: bool = True) -> CalibrationStats:
    """Statistics of ``groups`` of layers over the token blocks ``blocks`` [N, T], in one pass."""
    collector = GroupCollector(model, groups, features, keep_samples, means)
    capture(model, blocks, collector, layers=collector.layers(), desc=desc, progress=progress)
    return collector.stats()


#: the features the baselines' shared pass collects
BASELINE_FEATURES = ("k_post", "k_pre", "v")


@dataclass
class Calibration:
    """What methods may learn from: token blocks of the calibration split ([N, T] ids), and the statistics
    computed from them (shared by every method and ratio of one run)."""

    blocks: torch.Tensor
    cache: dict = field(default_factory=dict)

    def group_moments(self, model, groups: list[list[int]], progress: bool = True) -> dict:
        """Mean/covariance of the K and V features of each group of layers, over the calibration blocks.

        Returns ``{"k_post": [...], "k_pre": [...] or None, "v": [...]}``, one
        :class:`~echokv.stats.moments.ValueMoments` per group (see :data:`FEATURES`). A request whose groups
        each lie inside a group already captured is answered by slicing, without running the model again; a
        pass captures blocks of :data:`CAPTURE_BLOCK` adjacent full-attention layers whenever the requested
        groups fit in them.
        """
        groups = [list(g) for g in groups]
        found = self._from_cache(model, groups)
        if found is not None:
            return found
        layers = kv_geometry(model).full_attention_layers
        blocks = [layers[i : i + CAPTURE_BLOCK] for i in range(0, len(layers), CAPTURE_BLOCK)]
        fits = all(any(set(g) <= set(b) for b in blocks) for g in groups)
        captured = blocks if fits else groups
        stats = collect(model, self.blocks, captured, BASELINE_FEATURES, desc="baseline statistics",
                        progress=progress)
        self.cache[("group_moments", id(model), tuple(tuple(g) for g in captured))] = stats.moments
        return self._from_cache(model, groups)

    def _from_cache(self, model, groups):
        for key, val in self.cache.items():
            if not (isinstance(key, tuple) and key[:2] == ("group_moments", id(model))):
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
                    val[kind][host].select(have[host], g) for g, host in zip(groups, where)] for kind in val}
        return None
