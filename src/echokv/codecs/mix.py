"""The codec of retained components (:mod:`echokv.mixes`): per group of S layers, the components of its K
(pre-RoPE) and V, each at its precision, and the token positions the keys are rotated back at.

Stored per group: ``pos`` [B, 1, T, 1] int32 (pre-RoPE keys only), and per kind and width w the components kept at
w: ``k16`` [B, 1, T, c] in the model's dtype, or ``k8.q`` (packed codes), ``k8.s``, ``k8.z`` (float16 scale and
zero-point per token and group of components). 16-bit components are stored as float16.

Decoding a layer rebuilds its keys (``z R + c`` over the layer's columns of R, then RoPE at the stored positions)
and its values. The fast path (decode steps) rebuilds the keys the same way but never the values: attention's
weighted sum is taken over the components and mapped to the heads once,
``sum_t p_t (z_t R + c) = (sum_t p_t z_t) R + c sum_t p_t``. A group's components are dequantized once per step
and shared by its S layers.
"""

from __future__ import annotations

import os

import torch

from .. import attention, placement
from ..artifact import load
from ..cache.codec import KVCodec
from ..cache.compressed import CompressedCache, require_model
from ..mixes import FLOAT_WIDTHS, FP16_MAX, KINDS, Mixes, dequantize, quantize
from ..stats.rope import Rope, unrotate
from .fast import attention_weights


class MixCodec(KVCodec):
    """Stores a :class:`~echokv.mixes.Mixes`' retained components; rebuilds every head from them."""

    def __init__(self, mixes: Mixes, model):
        self.mixes, self.layout = mixes, mixes.layout
        self.needs_positions = mixes.layout.keys == "pre-rope"
        self.groups = [list(g) for g in self.layout.groups]
        self.pre_rope = self.layout.keys == "pre-rope"
        self.ropes = {layer: Rope(model, layer) for layer in self.layout.layers} if self.pre_rope else {}
        self.h, self.d = self.layout.num_kv_heads, self.layout.head_dim
        self.dtype = next(model.parameters()).dtype
        self._maps: dict = {}  # (part, layer, dtype) -> that layer's decoder columns and offset
        self._memo: dict = {}  # (group, kind) -> (a stored tensor, its length, the dequantized components)
        self._trigs: dict = {}  # RoPE table -> (positions, their cos/sin)
        self._pos = None  # (stored positions, as long [B, T])

    # -- storing ---------------------------------------------------------------------------------------------
    def encode(self, group, keys, values, positions=None):
        layers = self.groups[group]
        out = {}
        if self.pre_rope:
            if positions is None:
                raise ValueError("pre-RoPE keys need the positions of the tokens the cache compresses")
            positions = positions.to(keys[0].device)
            keys = [self._rotate(k, layer, positions, inverse=True) for k, layer in zip(keys, layers)]
            out["pos"] = positions.to(torch.int32)[:, None, :, None]
        for kind, xs in (("k", keys), ("v", values)):
            i = self.mixes.index(group, kind)
            x = torch.cat([x.float().transpose(1, 2).flatten(2) for x in xs], dim=-1)  # [B, T, D]
            with torch.no_grad():
                z = self.mixes.encode(i, x)
            for width, s, e in self.layout.parts[i].classes():
                name = f"{kind}{width}"
                if width == 32:
                    out[name] = z[..., s:e].float()[:, None]
                elif width == 16:  # float16: unit-variance components keep 3 more bits than in bfloat16
                    out[name] = z[..., s:e].clamp(-FP16_MAX, FP16_MAX).to(torch.float16)[:, None]
                else:
                    for key, t in quantize(z[..., s:e], width, self.layout.quant_group).items():
                        out[f"{name}.{key}"] = t[:, None]
        return out

    # -- reading ---------------------------------------------------------------------------------------------
    def components(self, group: int, kind: str, stored: dict) -> list[tuple[torch.Tensor, int, int]]:
        """The group's components of ``kind`` by precision class: ``(z [B, T, e - s], s, e)``, dequantized once per
        stored length. Never concatenated: a decoder takes each class with its own rows of R (a concatenation
        would copy every past token's components at every step)."""
        i = self.mixes.index(group, kind)
        classes = self.layout.parts[i].classes()
        first = stored[f"{kind}{classes[0][0]}" + ("" if classes[0][0] in FLOAT_WIDTHS else ".q")]
        memo = self._memo.get((group, kind))
        if memo is not None and memo[0] is first and memo[1] == first.shape[-2]:
            return memo[2]
        pieces = []
        for width, s, e in classes:
            name = f"{kind}{width}"
            if width in FLOAT_WIDTHS:
                z = stored[name][:, 0].to(self.dtype)
            else:
                st = {key: stored[f"{name}.{key}"][:, 0] for key in ("q", "s", "z")}
                z = dequantize(st, width, e - s, self.dtype, self.layout.quant_group)
            pieces.append((z, s, e))
        # one group's components at a time: layers run in order, and keeping every group's would hold a
        # dequantized copy of the whole cache
        for key in [k for k in self._memo if k[0] != group]:
            del self._memo[key]
        self._memo[(group, kind)] = (first, first.shape[-2], pieces)
        return pieces

    def _layer_map(self, i: int, layer: int, dtype):
        key = (i, layer, dtype)
        if key not in self._maps:
            with torch.no_grad():
                r, c = self.mixes.decoder(i, layer)
            self._maps[key] = (r.to(dtype).contiguous(), c.to(dtype))
        return self._maps[key]

    def _rotate(self, x: torch.Tensor, layer: int, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE (or its inverse) of x [B, H, T, d] at ``positions`` [B, T], in x's dtype (the inverse in float32:
        :func:`~echokv.stats.rope.unrotate`; the forward stays in the model's dtype, it runs at every decode step)."""
        if inverse:
            cos, sin = self.ropes[layer].table(int(positions.max()) + 1, x.device)
            return unrotate(x, cos[positions][:, None], sin[positions][:, None])
        cos, sin = self._trig(layer, positions, x.dtype)
        half = x.shape[-1] // 2
        out = x * cos  # rotate-half RoPE, x cos + rotate_half(x) sin, written half by half: no concatenation
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    def _trig(self, layer: int, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, d] at ``positions``, gathered once per stored length for all layers sharing a table."""
        rope = self.ropes[layer]
        key = (id(rope.module), tuple(sorted(rope.kwargs.items())), dtype)
        memo = self._trigs.get(key)
        if memo is not None and memo[0] is positions:
            return memo[1]
        cos, sin = rope.table(int(positions.max()) + 1, positions.device)
        trig = cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)
        self._trigs[key] = (positions, trig)
        return trig

    def _heads(self, group: int, kind: str, layer: int, stored: dict) -> torch.Tensor:
        """``layer``'s rebuilt keys or values [B, H, T, d] (keys with RoPE applied)."""
        pieces = self.components(group, kind, stored)
        r, c = self._layer_map(self.mixes.index(group, kind), layer, self.dtype)
        b, t = pieces[0][0].shape[:2]
        x = c.expand(b * t, -1)
        for z, s, e in pieces:
            x = torch.addmm(x, z.reshape(b * t, e - s), r[s:e])
        x = x.view(b, t, self.h, self.d).transpose(1, 2)
        if kind == "k" and self.pre_rope:
            x = self._rotate(x, layer, self._positions(stored))
        return x

    def _positions(self, stored: dict) -> torch.Tensor:
        """The stored tokens' positions [B, T] (one tensor per stored length: the RoPE memo is keyed on it)."""
        pos = stored["pos"]
        if self._pos is None or self._pos[0] is not pos:
            self._pos = (pos, pos[:, 0, :, 0].long())
        return self._pos[1]

    def decode(self, layer, stored):
        group = self.layout.group_of(layer)
        return self._heads(group, "k", layer, stored), self._heads(group, "v", layer, stored)

    def fast_attention(self, layer, stored):
        group = self.layout.group_of(layer)
        stored = dict(stored)  # the tensors as they are now: the cache may append to its store before the call
        return lambda q, k, v, mask, scaling: self._attend(group, layer, stored, q, k, v, mask, scaling)

    def _attend(self, group, layer, stored, q, recent_k, recent_v, mask, scaling):
        # scores, softmax and the weighted sums in float32 from the model-dtype keys and components, as SDPA's
        # kernels accumulate: rounding them to bfloat16 flipped near ties against the explicit path (issue #28)
        b, hq, tq, d = q.shape
        h = self.h
        rows = hq // h * tq
        qh = q.reshape(b, h, rows, d).float()
        keys = self._heads(group, "k", layer, stored)  # [B, H, Tc, d], rebuilt as the explicit path does
        tc = keys.shape[-2]
        p = attention_weights(qh @ keys.float().transpose(-1, -2), qh, recent_k.float(), mask, scaling, tq)
        p_past = p[..., :tc].reshape(b, h * rows, tc)
        r, c = self._layer_map(self.mixes.index(group, "v"), layer, torch.float32)
        # every query row's weighted sum of the components, class by class, then mapped to the heads once
        mixed = torch.cat([p_past @ z.float() for z, _, _ in self.components(group, "v", stored)], dim=-1)
        out = torch.einsum("bhrc,chd->bhrd", mixed.view(b, h, rows, -1), r.view(-1, h, d))
        out = out + p[..., :tc].sum(-1, keepdim=True) * c.view(h, 1, d) + p[..., tc:] @ recent_v.float()
        return out.to(q.dtype).reshape(b, hq, tq, d).transpose(1, 2).contiguous()


class EchoKVCache(CompressedCache):
    """EchoKV cache: ``EchoKVCache(model, artifact_dir_or_network, switch_at_tokens=4096)``.

    ``fast=True`` (the default where it applies) decodes compressed layers with the fast attention of
    :mod:`echokv.codecs.mix` inside the echokv attention scope (:func:`echokv.generate` opens it);
    ``fast=False`` always rebuilds K/V explicitly (the reference).
    """

    def __init__(self, model, artifact, mode: str | None = None, **kwargs):
        codec = mix_codec(model, artifact)
        if mode is None:  # a switch condition means auto mode
            auto = kwargs.get("switch_at_tokens") is not None or kwargs.get("memory_budget_bytes") is not None
            mode = "auto" if auto else "full"
        kwargs.setdefault("fast", attention.serves(model))
        super().__init__(model, codec, mode=mode, **kwargs)


def mix_codec(model, artifact) -> KVCodec:
    """The codec of a trained artifact (its folder, or the network :func:`echokv.training.train` returned), its
    groups placed where their layers run."""
    require_model(model)
    if not isinstance(artifact, (Mixes, str, os.PathLike)):
        raise TypeError(f"EchoKVCache needs an artifact: the folder `echokv train` wrote (str or path) or the "
                        f"network echokv.training.train returned, got {artifact!r}")
    network = artifact if isinstance(artifact, Mixes) else load(artifact, model)
    devices = placement.layer_devices(model)
    network.place([placement.group_device(g, devices) for g in network.layout.groups])
    return MixCodec(network, model)


__all__ = ["KINDS", "EchoKVCache", "MixCodec", "mix_codec"]
