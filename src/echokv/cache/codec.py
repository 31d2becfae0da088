"""The codec protocol: what compressed tokens become. A new codec is one file in :mod:`echokv.codecs`.

A codec splits the compressed layers into ``groups``; each group's tokens are stored together in one
:class:`~echokv.cache.store.GroupStore` that the group's layers share (EchoKV: S layers, whose retained heads
reconstruct each other; per-layer codecs: one layer each). The cache calls

* :meth:`KVCodec.encode` with the full K/V of a block of tokens of one group (and, when it asks, their positions)
  -> tensors appended to its store;
* :meth:`KVCodec.decode` with one layer and its group's stored tensors -> that layer's full K/V;
* :meth:`KVCodec.fast_attention` (optional) -> a function computing that layer's attention over the stored
  tokens without decoding them (used only inside :func:`~echokv.attention.echokv_attention`).

Stored tensors keep the token axis at dim -2 (the store grows them there, and selects batches on dim 0).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


class KVCodec(ABC):
    """How compressed tokens are stored (see the module docstring)."""

    #: the compressed layers, split into groups that are stored together
    groups: list[list[int]]
    #: whether :meth:`encode` needs the tokens' positions (``positions=`` [B, T]), e.g. to undo RoPE
    needs_positions: bool = False
    #: whether :meth:`encode` needs ``start``, the slot of the block's first token in the sequence (the cache
    #: knows it, so a codec keeps no per-sequence state that a reset or a batch edit could leave behind)
    needs_start: bool = False
    #: tokens are handed to :meth:`encode` in multiples of this; the rest stays exact in the cache until a block is
    #: complete (a codec whose encoding is costly per call encodes once per block)
    token_block: int = 1

    @property
    def layers(self) -> list[int]:
        return sorted(layer for group in self.groups for layer in group)

    @abstractmethod
    def encode(self, group: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full K/V [B, H, T, d] of the layers of ``groups[group]`` (in order) -> the tensors to store. A codec
        with :attr:`needs_positions` is also given ``positions`` [B, T] (int64), the tokens' RoPE positions."""

    @abstractmethod
    def decode(self, layer: int, stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full K/V [B, H, T_stored, d] of ``layer`` from its group's stored tensors."""

    def fast_attention(self, layer: int, stored: dict[str, torch.Tensor]) -> Callable | None:
        """Optional: fn(q, recent_k, recent_v, mask, scaling) -> attention output over the stored tokens and
        the recent ones, without decoding; ``None`` when the codec has no such path."""
        return None
