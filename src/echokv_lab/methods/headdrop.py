"""Head dropping: EchoKV's retained heads, the discarded ones filled without a network.

The ablation of EchoKV (arXiv 2603.22910) that isolates what its reconstruction buys: the cache
keeps exactly the KV heads of a head-only EchoKV artifact of the same ratio when the run has one
(``artifact``; ``echokv eval`` passes the run's: the same retained heads, no network), otherwise the paper
layout at that ratio (:func:`~echokv.selection.nearest_paper_layout`: per group of S layers the first
layer whole and the first m heads of the others), and attention sees, in place of each discarded head,

* ``fill="mean"`` (default): that head's mean cached K/V over the calibration text (keys after RoPE,
  as cached; per (layer, head), one d-vector, the same for every token);
* ``fill="zero"``: zeros (a zero key gives the head's tokens a logit of 0, a zero value contributes
  nothing).

Parameters
    fill: ``"mean"`` or ``"zero"``.
    group_size, m: force the paper layout's S and m (default: searched for the ratio, like EchoKV).
    artifact: a head-only (``--variant heads``) EchoKV artifact folder whose retained heads to keep.

Memory: the kept fraction is the layout's, ``kept heads / all heads`` of the full-attention layers
(:attr:`achieved_kept_fraction`; the nearest paper layout, so not every ratio is reachable exactly).
The means are method parameters (``2 * L * H * d`` float32 numbers, :meth:`parameter_bytes`).

Simplified: nothing; this is the baseline by construction (the fill is a constant per head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from echokv.artifact import config_variant, load, read_config
from echokv.codecs.headdrop import HeadDropCodec
from echokv.models import kv_geometry
from echokv.selection import HeadLayout, make_groups, nearest_paper_layout
from echokv_lab.methods.base import Method, register, require_calibration
from echokv_lab.methods.echokv import artifacts_at

FILLS = ("mean", "zero")


def head_layout(layout) -> HeadLayout:
    """The retained heads of a heads-variant :class:`~echokv.mixes.MixLayout`: each part's ``selection``
    (layer-major head indices of the group)."""
    if any(part.selection is None for part in layout.parts):
        raise ValueError("head-drop needs retained heads; this artifact keeps learned components "
                         "(retrain with echokv train --variant heads)")
    h = layout.num_kv_heads
    kept = {kind: [(part.layers[i // h], i % h) for part in layout.parts if part.kind == kind
                   for i in part.selection] for kind in ("k", "v")}
    return HeadLayout(layout.layers, h, layout.groups, kept["k"], kept["v"], "all", "artifact")


@dataclass
class HeadDropMethod(Method):
    """EchoKV's retained heads, discarded heads filled with the calibration mean or zeros."""

    name: str = "headdrop"
    fill: str = "mean"
    group_size: int | None = None
    m: int | None = None
    artifact: str | None = None
    layout: HeadLayout | None = field(default=None, repr=False)
    means: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.fill not in FILLS:
            raise ValueError(f"unknown fill {self.fill!r}; choose one of {', '.join(FILLS)}")
        if self.artifact is not None and config_variant(read_config(self.artifact)) != "heads":
            raise ValueError(f"{self.name}: artifact {self.artifact} keeps learned components, not heads; "
                             "head-drop needs a head-only artifact (echokv train --variant heads)")

    @classmethod
    def create(cls, ratio, artifacts=None, **kwargs):
        """The same retained heads as the run's head-only EchoKV artifact of this ratio, if it has one."""
        heads = artifacts_at(artifacts, ratio, "heads")
        return cls(ratio, artifact=heads[0] if heads else None, **kwargs)

    def prepare(self, model, tokenizer, calibration) -> None:
        geo = kv_geometry(model)
        layers = geo.full_attention_layers
        if self.artifact is not None:
            self.layout = head_layout(load(self.artifact, model).layout)  # refuses an artifact of another model
        else:
            self.layout = nearest_paper_layout(layers, geo.num_kv_heads, self.compression_ratio,
                                               group_size=self.group_size, m=self.m)
        if self.fill == "mean":
            cal = require_calibration(calibration, f"{self.name} (fill='mean')")
            mom = cal.group_moments(model, make_groups(layers, 1))
            self.means = {
                kind: {lay: mom[src][i].mean.float() for i, lay in enumerate(layers)}
                for kind, src in (("k", "k_post"), ("v", "v"))
            }

    def make_codec(self, model):
        if self.layout is None and self.fill == "zero":  # nothing to learn
            self.prepare(model, None, None)
        if self.layout is None:
            raise RuntimeError(f"{self.name}: call prepare(model, tokenizer, calibration) first")
        geo = kv_geometry(model)
        return HeadDropCodec(self.layout, geo.num_kv_heads, geo.head_dim, self.means if self.fill == "mean" else None)

    # -- reporting --------------------------------------------------------------------------------
    @property
    def achieved_kept_fraction(self) -> float:
        return self.layout.kept_fraction()

    def parameter_bytes(self) -> int:
        if self.fill != "mean" or not self.means:
            return 0
        return sum(4 * t.numel() for per in self.means.values() for t in per.values())

    def info(self) -> dict:
        return {
            **super().info(),
            "fill": self.fill,
            "layout": self.layout.strategy,
            "artifact": self.artifact,
            "group_size": len(self.layout.groups[0]),
            "m": len(self.layout.retained_in_layer("k", self.layout.groups[0][-1]))
            if len(self.layout.groups[0]) > 1 else None,
            "target_kept_fraction": 1.0 - self.compression_ratio,
        }


register("headdrop")(HeadDropMethod)
