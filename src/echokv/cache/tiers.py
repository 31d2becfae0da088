"""Tiers of compression switched on memory pressure: full -> a fast codec -> a smaller one.

:class:`TieredCache` runs in full mode until its bytes pass ``memory_budget_bytes``, then stores its past with the
first codec of ``tiers`` (for example EchoKV-Q at 0.5: decodes as fast as full mode); when the compressed cache
passes the budget again, the stored tokens are decoded and re-encoded by the next codec (for example the cross-layer
mix at 0.875: an eighth of the bytes, slower to decode), and so on down the ladder. The last tier grows past the
budget (there is nothing smaller to go to); :meth:`TieredCache.memory_report` says so, and which tier holds which
tokens.

A tier change decodes what the tier above stored, so the tokens pay both codecs' errors; the re-encoding runs once,
one group of the new codec at a time (its peak memory is that group's full K/V).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import placement
from .codec import KVCodec
from .compressed import CompressedCache
from .store import GroupStore


def _named(tiers) -> list[tuple[str, KVCodec]]:
    items = list(tiers.items()) if isinstance(tiers, Mapping) else [
        (getattr(c, "name", None) or f"tier{i + 1}", c) for i, c in enumerate(tiers)]
    if not items:
        raise ValueError("tiers needs at least one codec (the first one the cache switches to)")
    for name, codec in items:
        if not isinstance(codec, KVCodec):
            raise TypeError(f"tier {name!r} is not a codec (echokv.cache.codec.KVCodec), got {type(codec).__name__}")
    layers = items[0][1].layers
    for name, codec in items[1:]:
        if codec.layers != layers:
            raise ValueError(f"tier {name!r} compresses layers {codec.layers}, the first tier {layers}: every tier "
                             "must compress the same layers (codecs fitted for the same model)")
    return items


class TieredCache(CompressedCache):
    """Full until ``memory_budget_bytes``, then each codec of ``tiers`` in turn while the budget is passed.

    Args:
        model: the model the cache is used with.
        tiers: the codecs from the first (least compressed) to the last: a sequence, or a mapping name -> codec
            (the names :meth:`memory_report` uses).
        memory_budget_bytes: the bytes the cache should hold at most.
        full_window, fast: as :class:`~echokv.cache.CompressedCache`.
    """

    def __init__(self, model, tiers: Sequence[KVCodec] | Mapping[str, KVCodec], memory_budget_bytes: int,
                 full_window: int = 0, fast: bool = True):
        named = _named(tiers)
        super().__init__(model, named[0][1], mode="auto", memory_budget_bytes=memory_budget_bytes,
                         full_window=full_window, fast=fast)
        self.tiers = named
        self.tier = 0  # the codec in use once compressed (self.codec is tiers[tier])
        self._devices = placement.layer_devices(model)
        #: RoPE positions [B, n] of the stored tokens, where a tier undoes RoPE (kept for a later tier change)
        self.stored_positions: torch.Tensor | None = None
        self._descents: list[tuple[str, int]] = []  # (tier name, tokens held) at each step below the first tier

    # -- positions: every tier's needs ---------------------------------------------------------------------
    def _records_positions(self) -> bool:
        return any(codec.needs_positions for _, codec in self.tiers)

    def _keep_positions(self, positions: torch.Tensor) -> None:
        self.stored_positions = positions if self.stored_positions is None else torch.cat(
            [self.stored_positions, positions], dim=1)

    # -- the ladder --------------------------------------------------------------------------------------------
    def _over(self) -> bool:
        return self.nbytes() > self.memory_budget_bytes

    @property
    def tier_changes(self) -> list[tuple[str, int]]:
        """(tier name, tokens the cache held) at every switch, full -> the first tier included."""
        first = [(self.tiers[0][0], self.switched_at)] if self.is_compressed else []
        return first + self._descents

    def _after_forward(self) -> None:
        super()._after_forward()
        if self._deferred or not self.is_compressed:
            return
        while self.tier + 1 < len(self.tiers) and self._over():
            self._descend()

    def _use(self, tier: int) -> None:
        """Store with ``tiers[tier]`` from now on: new, empty stores, the layers pointed at them."""
        codec = self.tiers[tier][1]
        self.stores = [GroupStore(g, placement.group_device(g, self._devices)) for g in codec.groups]
        for store in self.stores:
            for i in store.layers:
                self.layers[i].store, self.layers[i].codec = store, codec
        self.codec, self.tier = codec, tier

    def _descend(self) -> None:
        """Re-encode every stored token with the next tier's codec; the old stores are freed group by group."""
        old_codec, old_stores = self.codec, self.stores
        held = old_stores[0].n_tokens
        n = held - held % self.tiers[self.tier + 1][1].token_block  # the rest goes back to the exact recent tokens
        owner = {i: store for store in old_stores for i in store.layers}
        unread = {id(store): len(store.layers) for store in old_stores}
        self._use(self.tier + 1)
        codec = self.codec
        for gi, store in enumerate(self.stores):
            keys, values = [], []
            for i in store.layers:
                k, v = old_codec.decode(i, owner[i].tensors)
                if n < held:
                    lay = self.layers[i]
                    back = [x[..., n:, :].to(lay.keys.device, lay.keys.dtype) for x in (k, v)]
                    lay.keys, lay.values = torch.cat([back[0], lay.keys], -2), torch.cat([back[1], lay.values], -2)
                    k, v = k[..., :n, :], v[..., :n, :]
                if store.device is not None and k.device != store.device:
                    k, v = owner[i].move(k, store.device), owner[i].move(v, store.device)
                keys.append(k)
                values.append(v)
                unread[id(owner[i])] -= 1
                if not unread[id(owner[i])]:
                    owner[i].reset()  # every layer of that old group is decoded: its memory goes now
            extra = {}
            if codec.needs_positions:
                extra["positions"] = self.stored_positions[:, :n].to(keys[0].device)
            if codec.needs_start:
                extra["start"] = 0
            if n:
                store.append(codec.encode(gi, keys, values, **extra), n)
        if n < held and self.stored_positions is not None:  # the tokens put back keep their positions
            self.positions = torch.cat([self.stored_positions[:, n:], self.positions], dim=1)
            self.stored_positions = self.stored_positions[:, :n]
        self._descents.append((self.tiers[self.tier][0], self.seen_tokens()))
        self._flush()  # the new codec's block: recent tokens the old one kept exact may be due now

    # -- the cache protocol ----------------------------------------------------------------------------------
    def reset(self) -> None:
        if self.tier:
            self._use(0)
        super().reset()
        self.stored_positions = None
        self._descents = []

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.stored_positions is not None:
            self.stored_positions = self.stored_positions[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.stored_positions is not None:
            self.stored_positions = self.stored_positions.repeat_interleave(repeats, dim=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.stored_positions is not None:
            self.stored_positions = self.stored_positions.index_select(0, beam_idx.to(self.stored_positions.device))

    @property
    def tier_now(self) -> str:
        """The tier the stored tokens are in ("full" before the first switch)."""
        return self.tiers[self.tier][0] if self.is_compressed else "full"

    def memory_report(self) -> dict:
        stored = self.stores[0].n_tokens if self.stores else 0
        ranges = ([{"tier": self.tier_now, "tokens": [0, stored]}] if stored else []) + [
            {"tier": "full", "tokens": [stored, self.seen_tokens()]}]
        return {**super().memory_report(), "tier": self.tier_now, "tier_ranges": ranges, "tier_changes": [list(c) for c in self.tier_changes],
                "memory_budget_bytes": self.memory_budget_bytes, "over_budget": self._over(),
                "tiers": [name for name, _ in self.tiers]}
