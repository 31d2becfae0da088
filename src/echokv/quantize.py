"""Asymmetric integer codes with float16 scales and zero-points, packed ``8 / b`` per byte: the primitives the
network (:mod:`echokv.mixes`), the codecs and the kernels' reference share. A leaf: it imports torch only.

A group of channels is stored as b-bit codes ``q = round((x - z) / s)`` in ``[0, 2^b - 1]`` with its own scale ``s``
and zero-point ``z`` (float16), and read back as ``q * s + z``. Rounding of ``s`` (up) and ``z`` (down) to float16
keeps every value inside the group's code range: the round-trip error is at most half a step ``s / 2``.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
FP16_MAX = 65504.0


def round_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> float16, rounded towards +inf (``up``) or -inf, so the result bounds x."""
    h = x.clamp(-FP16_MAX, FP16_MAX).to(SCALE_DTYPE)
    bad = h.float() < x if up else h.float() > x
    if bad.any():
        target = torch.full_like(h, float("inf") if up else float("-inf"))
        h = torch.where(bad, torch.nextafter(h, target), h)
    return h


def quantize(x: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """x [..., d] -> {"q": packed uint8 [..., d*bits/8], "s": scale, "z": zero [..., d/group] fp16}."""
    xf = x.float().clamp(-FP16_MAX, FP16_MAX)
    xg = xf.unflatten(-1, (-1, group))
    levels = 2**bits - 1
    zero = round_fp16(xg.amin(-1), up=False)
    span = xg.amax(-1) - zero.float()
    scale = round_fp16(span / levels, up=True)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # constant group: q = 0 is exact
    q = ((xg - zero.float()[..., None]) / scale.float()[..., None]).round().clamp_(0, levels).to(torch.uint8)
    return {"q": pack(q.flatten(-2), bits), "s": scale, "z": zero}


def dequantize(stored: dict[str, torch.Tensor], bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    q = unpack(stored["q"], bits).float().unflatten(-1, (-1, group))
    x = q * stored["s"].float()[..., None] + stored["z"].float()[..., None]
    return x.flatten(-2).to(dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] of ``bits`` < 8 -> [..., ceil(d * bits / 8)] bytes (little end first; a last byte
    that is not full is padded with zero codes, which :func:`unpack` gives back)."""
    if bits == 8:
        return q
    per = 8 // bits
    if q.shape[-1] % per:
        q = torch.nn.functional.pad(q, (0, per - q.shape[-1] % per))
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
