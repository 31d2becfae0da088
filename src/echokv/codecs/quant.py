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
from ..quantize import FP16_MAX, SCALE_DTYPE, dequantize, pack, quantize, unpack

__all__ = ["SCALE_DTYPE", "KiviCodec", "QuantCodec", "dequantize", "pack", "quantize", "unpack"]


class QuantCodec(KVCodec):
    """Stores every token's K/V as packed b-bit codes + fp16 scale and zero per channel group."""

    def __init__(self, layers: list[int], bits: int | None, group: int, dtype: torch.dtype):
        self.groups = [[i] for i in layers]
        self.bits, self.group, self.dtype = bits, group, dtype

    def _enc(self, x: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
        if self.bits is None:
            return {kind: x.contiguous()}
        if self.bits == 16:
            return {kind: x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16)}
        return {kind + name: t.contiguous() for name, t in quantize(x, self.bits, self.group).items()}

    def _dec(self, s: dict, kind: str) -> torch.Tensor:
        if self.bits is None or self.bits == 16:
            return s[kind].to(self.dtype)
        return dequantize({n: s[kind + n] for n in ("q", "s", "z")}, self.bits, self.group, self.dtype)

    def encode(self, group, keys, values):
        return {**self._enc(keys[0], "k"), **self._enc(values[0], "v")}

    def decode(self, layer, stored):
        return self._dec(stored, "k"), self._dec(stored, "v")


class KiviCodec(QuantCodec):
    """KIVI's layout (Liu et al. 2024, arXiv 2402.02750): keys quantized *per channel* over groups of
    ``token_group`` tokens (outlier channels get their own scales), values per token over groups of ``group``
    channels. A block handed to :meth:`encode` must hold a multiple of ``token_group`` tokens
    (:class:`~echokv_lab.methods.quant.KiviCache` flushes whole groups; the tokens of the last, incomplete group
    stay in full precision, KIVI's residual).

    Stored keys keep the token axis at dim -2 as ``[B, H, n_groups * d, ...]`` rows (one row per channel of each
    token group), so the store grows them like any other tensor."""

    def __init__(self, layers: list[int], bits: int, group: int, token_group: int, dtype: torch.dtype):
        if bits is None or bits >= 16:
            raise ValueError("KIVI quantizes to 1, 2, 4 or 8 bits")
        super().__init__(layers, bits, group, dtype)
        self.token_group = token_group

    def encode(self, group, keys, values):
        k = keys[0]
        t = k.shape[2]
        if t % self.token_group:
            raise ValueError(f"KIVI encodes whole groups of {self.token_group} tokens, got {t}")
        x = k.unflatten(2, (t // self.token_group, self.token_group)).transpose(-1, -2)  # [B,H,T/G,d,G]
        stored = quantize(x, self.bits, self.token_group)  # one scale per (token group, channel)
        out = {"k" + name: v.flatten(2, 3).contiguous() for name, v in stored.items()}  # rows: token group x channel
        return {**out, **self._enc(values[0], "v")}

    def decode(self, layer, stored):
        q = stored["kq"]
        rows = q.shape[2]
        d = stored["vq"].shape[-1] * 8 // self.bits
        parts = {n: stored["k" + n].unflatten(2, (rows // d, d)) for n in ("q", "s", "z")}
        x = dequantize(parts, self.bits, self.token_group, self.dtype)  # [B,H,T/G,d,G]
        keys = x.transpose(-1, -2).flatten(2, 3)
        return keys, self._dec(stored, "v")
