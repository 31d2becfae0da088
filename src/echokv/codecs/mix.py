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

import torch
from transformers.models.llama.modeling_llama import rotate_half

from ..cache.codec import KVCodec
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
    def components(self, group: int, kind: str, stored: dict) -> torch.Tensor:
        """The group's components of ``kind`` [B, T, r], dequantized (once per stored length)."""
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
                pieces.append(stored[name][:, 0].to(self.dtype))
            else:
                st = {key: stored[f"{name}.{key}"][:, 0] for key in ("q", "s", "z")}
                pieces.append(dequantize(st, width, e - s, self.dtype, self.layout.quant_group))
        z = torch.cat(pieces, dim=-1)
        self._memo[(group, kind)] = (first, first.shape[-2], z)
        return z

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
        cos, sin = self.ropes[layer].table(int(positions.max()) + 1, x.device)
        cos, sin = cos[positions][:, None], sin[positions][:, None]  # [B, 1, T, d]
        if inverse:
            return unrotate(x, cos, sin)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def _heads(self, group: int, kind: str, layer: int, stored: dict) -> torch.Tensor:
        """``layer``'s rebuilt keys or values [B, H, T, d] (keys with RoPE applied)."""
        z = self.components(group, kind, stored)
        r, c = self._layer_map(self.mixes.index(group, kind), layer, z.dtype)
        x = torch.addmm(c, z.flatten(0, 1), r).view(z.shape[0], z.shape[1], self.h, self.d).transpose(1, 2)
        if kind == "k" and self.pre_rope:
            x = self._rotate(x, layer, stored["pos"][:, 0, :, 0].long())
        return x

    def decode(self, layer, stored):
        group = self.layout.group_of(layer)
        return self._heads(group, "k", layer, stored), self._heads(group, "v", layer, stored)

    def fast_attention(self, layer, stored):
        group = self.layout.group_of(layer)
        stored = dict(stored)  # the tensors as they are now: the cache may append to its store before the call
        return lambda q, k, v, mask, scaling: self._attend(group, layer, stored, q, k, v, mask, scaling)

    def _attend(self, group, layer, stored, q, recent_k, recent_v, mask, scaling):
        b, hq, tq, d = q.shape
        h = self.h
        rows = hq // h * tq
        qh = q.reshape(b, h, rows, d)
        keys = self._heads(group, "k", layer, stored).to(q.dtype)  # [B, H, Tc, d]
        tc = keys.shape[-2]
        p = attention_weights(qh @ keys.transpose(-1, -2), qh, recent_k, mask, scaling, tq)
        p_past = p[..., :tc]
        z = self.components(group, "v", stored).to(q.dtype)  # [B, Tc, r]
        r, c = self._layer_map(self.mixes.index(group, "v"), layer, q.dtype)
        mixed = p_past.reshape(b, h * rows, tc) @ z  # every query row's weighted sum of the components
        out = torch.einsum("bhrc,chd->bhrd", mixed.view(b, h, rows, -1), r.view(-1, h, d))
        out = out + p_past.sum(-1, keepdim=True) * c.view(h, 1, d) + p[..., tc:] @ recent_v
        return out.reshape(b, hq, tq, d).transpose(1, 2).contiguous()


__all__ = ["KINDS", "MixCodec"]
