"""Per-token, group-wise asymmetric integer codes with float16 scales and zero-points.

Each token's K and V are cut, per head, into groups of ``group`` channels; a group is stored as b-bit codes
``q = round((x - z) / s)`` in ``[0, 2^b - 1]`` with its own scale ``s`` and zero-point ``z`` (float16), and read
back as ``q * s + z``. Codes of b < 8 bits are packed ``8 / b`` per byte, so the stored bytes are real.
Rounding of ``s`` (up) and ``z`` (down) to float16 is done so that every value stays inside the group's code
range: the round-trip error is at most half a step ``s / 2``. 16 bits: a plain float16 copy, no scales.
"""

from __future__ import annotations

import torch

from ..cache.codec import KVCodec

SCALE_DTYPE = torch.float16
_FP16_MAX = 65504.0


def _round_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> float16, rounded towards +inf (``up``) or -inf, so the result bounds x."""
    h = x.clamp(-_FP16_MAX, _FP16_MAX).to(SCALE_DTYPE)
    bad = h.float() < x if up else h.float() > x
    if bad.any():
        target = torch.full_like(h, float("inf") if up else float("-inf"))
        h = torch.where(bad, torch.nextafter(h, target), h)
    return h


def quantize(x: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """x [..., d] -> {"q": packed uint8 [..., d*bits/8], "s": scale, "z": zero [..., d/group] fp16}."""
    xf = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    xg = xf.unflatten(-1, (-1, group))
    levels = 2**bits - 1
    zero = _round_fp16(xg.amin(-1), up=False)
    span = xg.amax(-1) - zero.float()
    scale = _round_fp16(span / levels, up=True)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # constant group: q = 0 is exact
    q = ((xg - zero.float()[..., None]) / scale.float()[..., None]).round().clamp_(0, levels).to(torch.uint8)
    return {"q": pack(q.flatten(-2), bits), "s": scale, "z": zero}


def dequantize(stored: dict[str, torch.Tensor], bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    q = unpack(stored["q"], bits).float().unflatten(-1, (-1, group))
    x = q * stored["s"].float()[..., None] + stored["z"].float()[..., None]
    return x.flatten(-2).to(dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] of ``bits`` < 8 -> [..., d * bits / 8] bytes (little end first)."""
    if bits == 8:
        return q
    per = 8 // bits
    q = q.unflatten(-1, (-1, per))
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for j in range(per):
        out |= q[..., j] << (bits * j)
    return out


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return p
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(p >> (bits * j)) & mask for j in range(per)], dim=-1).flatten(-2)


class QuantCodec(KVCodec):
    """Stores every token's K/V as packed b-bit codes + fp16 scale and zero per channel group."""

    def __init__(self, layers: list[int], bits: int | None, group: int, dtype: torch.dtype):
        self.groups = [[i] for i in layers]
        self.bits, self.group, self.dtype = bits, group, dtype

    def _enc(self, x: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
        if self.bits is None:
            return {kind: x.contiguous()}
        if self.bits == 16:
            return {kind: x.float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)}
        return {kind + name: t.contiguous() for name, t in quantize(x, self.bits, self.group).items()}

    def _dec(self, s: dict, kind: str) -> torch.Tensor:
        if self.bits is None or self.bits == 16:
            return s[kind].to(self.dtype)
        return dequantize({n: s[kind + n] for n in ("q", "s", "z")}, self.bits, self.group, self.dtype)

    def encode(self, group, keys, values):
        return {**self._enc(keys[0], "k"), **self._enc(values[0], "v")}

    def decode(self, layer, stored):
        return self._dec(stored, "k"), self._dec(stored, "v")
