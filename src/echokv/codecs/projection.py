"""Low-rank latents of fixed bases: each basis projects some K or V features of a group of layers (layers,
then heads, then channels) to r numbers per token, and its transpose rebuilds them (lowrank: per layer,
xlayer-svd: shared by adjacent layers). Keys may be projected before RoPE: rotated back with the model's own
cos/sin when stored, forward again when rebuilt (:mod:`echokv.stats.rope`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.codec import KVCodec
from ..models import kv_geometry
from ..placement import group_device, layer_devices
from ..stats.rope import Rope, rotate, unrotate


@dataclass
class Basis:
    """One latent: ``kind`` features of ``layers`` x ``heads`` (layer-major), projected to rank r."""

    kind: str
    layers: list[int]
    heads: list[int]
    mean: torch.Tensor  # [D] float32
    basis: torch.Tensor  # [D, r] float32
    name: str = ""

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def dims(self) -> int:
        return self.basis.shape[0]

    def num_parameters(self) -> int:
        """Numbers held for this basis (the mean only when it is used, i.e. centred)."""
        return self.basis.numel() + (self.mean.numel() if bool(self.mean.any()) else 0)


class ProjectionCodec(KVCodec):
    """Stores, per :class:`Basis`, the latent ``[B, 1, T, r]`` of its features, named after the basis, in the
    store of its group of layers. ``keys="pre_rope"`` projects keys with RoPE undone (at the slots from ``start``,
    which the cache passes)."""

    needs_start = True

    def __init__(self, model, bases: list[Basis], keys: str):
        geo = kv_geometry(model)
        self.h, self.d = geo.num_kv_heads, geo.head_dim
        self.bases = bases
        self.groups = [list(g) for g in dict.fromkeys(tuple(b.layers) for b in bases)]
        self.pre_rope = keys == "pre_rope"
        self.ropes = {lay: Rope(model, lay) for lay in self.layers} if self.pre_rope else {}
        devices = layer_devices(model)
        for b in bases:  # on the device of the basis's layers
            dev = group_device(b.layers, devices)
            b.mean, b.basis = b.mean.to(dev), b.basis.to(dev)
        # per (layer, kind): [(basis, its basis rows for this layer, its mean rows for this layer)]
        self.layer_bases: dict[tuple[int, str], list] = {}
        for b in bases:
            width = len(b.heads) * self.d
            for j, lay in enumerate(b.layers):
                rows = slice(j * width, (j + 1) * width)
                self.layer_bases.setdefault((lay, b.kind), []).append((b, b.basis[rows], b.mean[rows]))

    def _features(self, kind: str, layer: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """[B, H, T, d] as cached -> [B, T, H, d] float32 in the projected space."""
        if kind == "k" and self.pre_rope:
            cos, sin = self.ropes[layer].at(start, x.shape[2], x.device)
            x = unrotate(x, cos, sin)
        return x.float().transpose(1, 2)

    def encode(self, group, keys, values, start: int = 0):
        layers = self.groups[group]
        feats = {}
        out = {}
        for b in self.bases:
            if b.layers != layers:
                continue
            src = keys if b.kind == "k" else values
            parts = []
            for j, lay in enumerate(b.layers):
                if (b.kind, lay) not in feats:
                    feats[(b.kind, lay)] = self._features(b.kind, lay, src[j], start)
                parts.append(feats[(b.kind, lay)][:, :, b.heads].flatten(2))
            x = torch.cat(parts, dim=-1)  # [B, T, D]
            z = (x - b.mean) @ b.basis  # [B, T, r]
            out[b.name] = z.to(src[0].dtype).unsqueeze(1).contiguous()
        return out

    def decode(self, layer, stored):
        res = []
        for kind in ("k", "v"):
            x = None
            for b, rows, mu in self.layer_bases[(layer, kind)]:
                z = stored[b.name][:, 0].float()  # [B, T, r]
                y = (z @ rows.T + mu).unflatten(-1, (len(b.heads), self.d))  # [B, T, h, d]
                if x is None:
                    x = y if len(b.heads) == self.h else y.new_zeros(*y.shape[:2], self.h, self.d)
                if len(b.heads) != self.h:
                    x[:, :, b.heads] = y
            x = x.transpose(1, 2)  # [B, H, T, d]
            if kind == "k" and self.pre_rope:
                cos, sin = self.ropes[layer].table(x.shape[2], x.device)
                x = rotate(x, cos, sin)
            res.append(x)
        return res[0], res[1]
