"""Retained-head selection: which (layer, head) pairs the compressed cache keeps, per group of S consecutive
full-attention layers (sliding-window layers are left alone), for keys and values apart. Every discarded pair
is rebuilt from all the retained pairs of its group.

* ``data`` (the default, measured best): per group, greedily keep the heads that best explain the others
  (least ridge residual, from calibration second moments); reaches any ratio exactly (up to one head);
* ``paper`` (EchoKV section 3): the first layer of each group kept whole, and the first m heads of the others.

The compression ratio is the fraction of the cache removed (kvpress convention): 0.5 keeps half.
"""

from __future__ import annotations

from dataclasses import dataclass

Head = tuple[int, int]  # (layer, kv head)

INPUTS = ("global+local", "all", "global", "local")


def check_ratio(ratio: float, what: str = "compression ratio") -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (the fraction of the KV cache removed), got {ratio!r}")
    return float(ratio)


def check_m(m, num_kv_heads: int) -> None:
    """The paper layout's local input size: heads kept in each non-first layer of a group."""
    if not isinstance(m, int) or not 0 <= m <= num_kv_heads:
        raise ValueError(f"local input size m={m!r} does not fit this model: it must be in "
                         f"[0, {num_kv_heads}]")


def make_groups(layers: list[int], group_size: int) -> list[list[int]]:
    if not isinstance(group_size, int) or group_size < 1 or group_size > len(layers):
        raise ValueError(
            f"group size S={group_size!r} does not fit this model: it must be between 1 and the number of "
            f"compressible (full-attention) layers, {len(layers)}"
        )
    return [layers[i : i + group_size] for i in range(0, len(layers), group_size)]


@dataclass
class HeadLayout:
    """Retained heads for K and V, the layer groups, and which retained heads feed each discarded one."""

    layers: list[int]
    num_kv_heads: int
    groups: list[list[int]]
    retained_k: list[Head]
    retained_v: list[Head]
    inputs: str = "global+local"
    strategy: str = "paper"

    def __post_init__(self):
        self.groups = [list(g) for g in self.groups]
        self.retained_k = sorted(tuple(h) for h in self.retained_k)
        self.retained_v = sorted(tuple(h) for h in self.retained_v)
        if self.inputs not in INPUTS:
            raise ValueError(f"unknown inputs {self.inputs!r}; choose one of {', '.join(INPUTS)}")

    # -- counting -------------------------------------------------------------------------------
    @property
    def total_heads(self) -> int:
        return len(self.layers) * self.num_kv_heads

    def kept_fraction(self, kind: str | None = None) -> float:
        """Fraction of the compressible layers' K+V (or only ``kind`` 'k'/'v') that is kept."""
        if kind is None:
            return (self.kept_fraction("k") + self.kept_fraction("v")) / 2
        return len(self.retained(kind)) / self.total_heads

    def retained(self, kind: str) -> list[Head]:
        return self.retained_k if kind == "k" else self.retained_v

    def retained_in_layer(self, kind: str, layer: int) -> list[int]:
        return [h for (lay, h) in self.retained(kind) if lay == layer]


def paper_layout(
    layers: list[int], num_kv_heads: int, group_size: int, m: int, inputs: str = "global+local"
) -> HeadLayout:
    """First layer of each group whole + the first ``m`` heads of every other layer."""
    groups = make_groups(layers, group_size)
    check_m(m, num_kv_heads)
    kept = []
    for group in groups:
        kept += [(group[0], h) for h in range(num_kv_heads)]
        kept += [(layer, h) for layer in group[1:] for h in range(m)]
    return HeadLayout(layers, num_kv_heads, groups, kept, kept, inputs=inputs, strategy="paper")


def paper_options(layers: list[int], num_kv_heads: int, max_group: int = 8) -> list[dict]:
    """Every (S, m) of the paper layout with the compression ratio it reaches exactly."""
    out = []
    for s in range(1, min(max_group, len(layers)) + 1):
        for m in range(num_kv_heads + 1):
            lay = paper_layout(layers, num_kv_heads, s, m)
            kept = lay.kept_fraction("k")
            out.append({"group_size": s, "m": m, "kept_fraction": kept, "compression_ratio": 1 - kept})
    return out


def nearest_paper_layout(layers, num_kv_heads, ratio, group_size=None, m=None, inputs="global+local"):
    """Paper layout closest to ``ratio``; S and/or m are searched when not given."""
    check_ratio(ratio)
    options = paper_options(layers, num_kv_heads, max_group=max(8, group_size or 0))
    if group_size is not None:
        make_groups(layers, group_size)
        options = [o for o in options if o["group_size"] == group_size]
    if m is not None:
        check_m(m, num_kv_heads)
        options = [o for o in options if o["m"] == m]
    # closest ratio; then the smaller group (cheaper, more local)
    best = min(options, key=lambda o: (round(abs(o["compression_ratio"] - ratio), 9), o["group_size"]))
    return paper_layout(layers, num_kv_heads, best["group_size"], best["m"], inputs=inputs)


def _budgets(groups: list[list[int]], num_kv_heads: int, ratio: float) -> list[int]:
    """Heads to keep per group so that the total is round((1 - ratio) * all heads)."""
    total = len([x for g in groups for x in g]) * num_kv_heads
    keep = round((1.0 - ratio) * total)
    sizes = [len(g) * num_kv_heads for g in groups]
    budgets = [int(keep * s // total) for s in sizes]
    i = 0
    while sum(budgets) < keep:  # spread the remainder, never above a group's size
        if budgets[i % len(groups)] < sizes[i % len(groups)]:
            budgets[i % len(groups)] += 1
        i += 1
    return budgets


def data_layout(layers, num_kv_heads, group_size, ratio_k, ratio_v, stats) -> HeadLayout:
    """Greedy per-group choice of retained heads from calibration second moments ``stats``.

    ``stats[kind][g]`` is the group's :mod:`echokv.stats.moments` object, heads ordered layer-major.
    """
    groups = make_groups(layers, group_size)
    kept = {}
    for kind, ratio in (("k", check_ratio(ratio_k)), ("v", check_ratio(ratio_v))):
        chosen_all = []
        for g, (group, budget) in enumerate(zip(groups, _budgets(groups, num_kv_heads, ratio))):
            n = len(group) * num_kv_heads
            chosen: list[int] = list(range(n)) if budget >= n else []
            while len(chosen) < budget:
                rest = [i for i in range(n) if i not in chosen]
                best = min(rest, key=lambda c: stats[kind][g].residual(chosen + [c], [i for i in rest if i != c]))
                chosen.append(best)
            chosen_all += [(group[i // num_kv_heads], i % num_kv_heads) for i in chosen]
        kept[kind] = chosen_all
    return HeadLayout(layers, num_kv_heads, groups, kept["k"], kept["v"], inputs="all", strategy="data")
