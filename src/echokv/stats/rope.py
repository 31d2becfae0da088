"""The model's RoPE, applied and undone: post-RoPE keys as cached are rotated back to pre-RoPE (where EchoKV
and the low-rank baselines encode them) and forward again, with the model's own cos/sin (``rotate_half``)."""

from __future__ import annotations

import inspect

import torch
from transformers.models.llama.modeling_llama import rotate_half

from ..models import text_config


class RopeUnavailable(RuntimeError):
    """The model has no rotary embedding module to undo RoPE with."""


def rotary_module(model):
    """The model's rotary embedding module (the one its decoder layers get cos/sin from), or None."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return getattr(base, "rotary_emb", None)


class Rope:
    """cos/sin of the model's RoPE for one layer, at any positions, in float32.

    A table for positions [0, n) is computed on demand and grown by doubling, so a decode step that
    rebuilds every layer computes it once. The table depends on positions only (like the model's own
    rotary buffers); it is not part of the KV cache.
    """

    def __init__(self, model, layer: int):
        self.module = rotary_module(model)
        if self.module is None:
            raise RopeUnavailable(
                f"{type(model).__name__} has no rotary embedding module (model.model.rotary_emb) to undo RoPE "
                "with; use the post-RoPE variant (keys='post_rope')"
            )
        self.kwargs = {}
        if "layer_type" in inspect.signature(self.module.forward).parameters:
            types = getattr(text_config(model), "layer_types", None)
            self.kwargs["layer_type"] = types[layer] if types else "full_attention"
        self._cos = self._sin = None

    def table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, d] (float32) of positions 0..n-1."""
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != torch.device(device):
            size = max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 64)
            # computed where the module's buffers are (the tables may be asked for on another device)
            buf = next(self.module.buffers(), None)
            at = buf.device if buf is not None and buf.device.type != "meta" else device
            pos = torch.arange(size, device=at)[None]
            x = torch.zeros(1, dtype=torch.float32, device=at)
            with torch.no_grad():
                cos, sin = self.module(x, pos, **self.kwargs)
            # (.to: a dispatched model's rotary module answers on its own execution device)
            self._cos, self._sin = cos[0].float().to(device), sin[0].float().to(device)
        return self._cos[:n], self._sin[:n]

    def at(self, start: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(start + n, device)
        return cos[start:], sin[start:]


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: k [..., T, d] pre-RoPE, cos/sin [T, d] -> post-RoPE (float32)."""
    k = k.float()
    return k * cos + rotate_half(k) * sin


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: k [..., T, d] post-RoPE -> pre-RoPE (float32); the exact inverse of :func:`rotate`
    (division by cos^2 + sin^2, so RoPE variants with an attention scaling are handled too)."""
    k = k.float()
    return (k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin)
