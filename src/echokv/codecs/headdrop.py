"""Retained heads as they are; the discarded ones rebuilt as a constant per head (a mean, or zero)."""

from __future__ import annotations

from ..cache.codec import KVCodec
from ..selection import HeadLayout


class HeadDropCodec(KVCodec):
    """Stores the retained heads of each layer; rebuilds the others as a constant per head (mean or zero)."""

    def __init__(self, layout: HeadLayout, num_kv_heads: int, head_dim: int, means: dict | None):
        self.layout = layout
        self.groups = [[i] for i in layout.layers]
        self.h, self.d = num_kv_heads, head_dim
        self.kept = {kind: {i: layout.retained_in_layer(kind, i) for i in layout.layers} for kind in ("k", "v")}
        self.dropped = {
            kind: {i: [h for h in range(num_kv_heads) if h not in self.kept[kind][i]] for i in layout.layers}
            for kind in ("k", "v")
        }
        self.means = means  # kind -> layer -> [H, d] float32, or None (zero fill)

    def encode(self, group, keys, values):
        (i,) = self.groups[group]
        return {"k": keys[0][:, self.kept["k"][i]].contiguous(), "v": values[0][:, self.kept["v"][i]].contiguous()}

    def decode(self, layer, stored):
        out = []
        for kind in ("k", "v"):
            s = stored[kind]  # [B, kept, T, d]
            b, _, t, _ = s.shape
            x = s.new_zeros(b, self.h, t, self.d)
            x[:, self.kept[kind][layer]] = s
            drop = self.dropped[kind][layer]
            if drop and self.means is not None:
                fill = self.means[kind][layer][drop].to(device=s.device, dtype=s.dtype)
                x[:, drop] = fill[None, :, None, :].expand(b, -1, t, -1)
            out.append(x)
        return out[0], out[1]
