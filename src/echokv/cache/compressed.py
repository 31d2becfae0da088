"""A transformers cache that runs in full mode and switches to a compressed store on demand.

``CompressedCache`` is a :class:`transformers.DynamicCache` whose full-attention layers are
:class:`~echokv.cache.layers.CompressedLayer` objects. In full mode they hold the same K/V tensors as
transformers' ``DynamicLayer`` (logits are bit-identical to the default cache), appended in place instead of
copied by ``torch.cat`` at every step. Once compressed, every token older than the optional full window W is
handed to the codec (:mod:`echokv.cache.codec`), group by group, into the group's shared
:class:`~echokv.cache.store.GroupStore`; each layer gives its full K/V back from there when attention asks.
Sliding-window layers keep their own behaviour.

Prefill: one ``model(...)`` call attends with the exact K/V of its own tokens; compression happens after the
call (:func:`echokv.generation.prefill` feeds a long prompt in chunks so the cache compresses between them).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .. import attention, placement
from ..config import CACHE_MODES
from ..models import kv_geometry
from . import accounting
from .codec import KVCodec
from .layers import CompressedLayer, GrowingLayer
from .store import GroupStore
from .switch import Switch, is_count


def require_model(model) -> None:
    if not (hasattr(model, "config") and hasattr(model, "parameters")):
        raise TypeError(f"a cache needs the model it is used with (a transformers causal LM, e.g. from "
                        f"echokv.load_model), got {type(model).__name__}: {model!r:.80}")


def _describe(model) -> str:
    """The model as a cache knows it: its KV geometry and dtype, and (a cheap fingerprint) its hidden size and
    vocabulary; two models that differ here cannot share a cache."""
    g = kv_geometry(model)
    cfg = getattr(model.config, "text_config", None) or model.config
    return (f"{g.model_type}, {g.num_layers} layers, {g.num_kv_heads} KV heads x {g.head_dim}, hidden size "
            f"{getattr(cfg, 'hidden_size', '?')}, vocabulary {getattr(cfg, 'vocab_size', '?')}, {g.dtype}")


def _switch_field(name: str) -> property:
    return property(lambda self: getattr(self.switch, name), lambda self, value: setattr(self.switch, name, value))


class CompressedCache(DynamicCache):
    """Full cache until a switch; compressed by ``codec`` afterwards.

    Args:
        model: the model the cache is used with (for its layer layout). The model is not changed.
        codec: what compressed tokens become (``None``: nothing is ever compressed).
        mode: ``"full"`` (until :meth:`compress` is called), ``"compressed"`` (from the first token),
            or ``"auto"`` (switch at ``switch_at_tokens`` or ``memory_budget_bytes``).
        switch_at_tokens: auto mode: compress once the context holds at least this many tokens.
        memory_budget_bytes: auto mode: compress once the cache would hold more than this many bytes.
        full_window: keep the most recent W tokens uncompressed (0: compress everything).
        fast: use the codec's fast attention where it has one, inside the echokv attention scope
            (:mod:`echokv.attention`); elsewhere the compressed past is rebuilt explicitly.
    """

    MODES = CACHE_MODES
    # the switch's settings, as attributes of the cache
    mode = _switch_field("mode")
    switch_at_tokens = _switch_field("at_tokens")
    memory_budget_bytes = _switch_field("budget_bytes")

    def __init__(
        self,
        model,
        codec: KVCodec | None,
        mode: str = "auto",
        switch_at_tokens: int | None = None,
        memory_budget_bytes: int | None = None,
        full_window: int = 0,
        fast: bool = False,
    ):
        require_model(model)
        switch = Switch(mode, switch_at_tokens, memory_budget_bytes)
        if not is_count(full_window, 0):
            raise ValueError(f"full_window must be a non-negative integer, got {full_window!r}")
        full_window = int(full_window)
        super().__init__(config=model.config)
        self.geometry = kv_geometry(model)
        self.made_for = _describe(model)  # generate / prefill refuse another model (:meth:`check_model`)
        if len(self.layers) != self.geometry.num_layers:  # config without layer types: build them now
            self.layers = [DynamicLayer() for _ in range(self.geometry.num_layers)]
            self.layer_class_to_replicate = None
        for i, layer in enumerate(self.layers):  # same tensors as stock, appended in place
            if type(layer) is DynamicLayer:
                self.layers[i] = GrowingLayer()
        self.codec = codec
        self.fast = fast
        # each layer's K/V stay on the device it runs on; each group's stored tokens on the group's device
        devices = placement.layer_devices(model) if codec is not None else {}
        self.stores = [GroupStore(group, placement.group_device(group, devices))
                       for group in (codec.groups if codec is not None else [])]
        self.compressible = sorted(i for store in self.stores for i in store.layers)
        fast_for = attention.config_ids(model) if fast else None
        for store in self.stores:
            for i in store.layers:
                if type(self.layers[i]) is not GrowingLayer:
                    raise ValueError(f"layer {i} is not a full-attention layer; the codec cannot compress it")
                self.layers[i] = CompressedLayer(i, store, codec, fast_for, devices[i])
        self.switch = switch
        self.full_window = full_window
        self.is_compressed = mode == "compressed"
        self.switched_at: int | None = 0 if self.is_compressed else None
        #: token ids [B, n] of what the cache holds, when only echokv's prefill / generate fed it (None otherwise):
        #: :func:`echokv.generation.generate` checks that a new call's input extends them
        self.token_ids: torch.Tensor | None = None
        # RoPE positions [B, T] of the recent (not yet compressed) tokens, for codecs that undo RoPE
        self.positions: torch.Tensor | None = None
        self._deferred = False

    # -- the cache protocol: each layer updates itself; the stores are handled once per group ----------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0 or layer_idx >= len(self.layers):  # a cache made for another model: one line
            self._check_same_model(key_states, layer_idx)
        if layer_idx == 0:  # the first layer of a forward call: does its input continue what the cache holds?
            self._check_continues(args, kwargs)
        if self._records_positions() and layer_idx == self.compressible[0]:
            self._record_positions(key_states, args, kwargs)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self._after_forward()
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def _check_continues(self, args, kwargs) -> None:
        """Refuse a forward call whose tokens start before the end of what the cache holds: a new prompt fed to a
        cache that still holds another one (its answer would attend to the old tokens). transformers 5.2 passes
        the cache slots (``cache_position``), newer versions the positions (``position_ids``; with left padding
        the unpadded row's, the largest, equals the slot). A call that continues (chunked prefill, a decode
        step, ``generate`` with the whole prompt, of which transformers feeds only the new tokens) passes."""
        held = self.get_seq_length()
        if held == 0:
            return
        extra = args[0] if args and isinstance(args[0], dict) else kwargs.get("cache_kwargs")
        inner = kwargs.get("kwargs")
        found = [d for d in (extra, inner, kwargs) if isinstance(d, dict)]
        pos = next((d["cache_position"] for d in found if d.get("cache_position") is not None),
                   next((d["position_ids"] for d in found if d.get("position_ids") is not None), None))
        if not isinstance(pos, torch.Tensor) or pos.numel() == 0:
            return
        first = int(pos[..., 0].max())
        if first < held:
            raise ValueError(
                f"this cache already holds {held} tokens, and the new input starts at position {first}: it is a new "
                "prompt, not a continuation (its answer would read the previous prompt). Call cache.reset() or make "
                "a new cache for each prompt; to continue, pass input that extends what the cache holds"
            )

    def check_model(self, model) -> None:
        """Refuse a model other than the one the cache was made for: ``ValueError`` naming both."""
        require_model(model)
        theirs = _describe(model)
        if theirs != self.made_for:
            raise ValueError(f"this cache was made for another model ({self.made_for}) than the one it is used "
                             f"with ({theirs}): make the cache with the model it runs with")

    def _check_same_model(self, key_states, layer_idx: int) -> None:
        """The same refusal inside a forward call (``model.generate`` with this cache): K/V of another shape, a
        layer the model of the cache has not, or a previous call that stopped before its last layer."""
        g = self.geometry
        heads, dim = key_states.shape[1], key_states.shape[-1]
        held = self.layers[0].get_seq_length()
        if layer_idx >= len(self.layers):
            theirs = f"at least {layer_idx + 1} layers"
        elif heads != g.num_kv_heads or dim != g.head_dim:
            theirs = f"{heads} KV heads x {dim}"
        elif held and self.layers[-1].get_seq_length() < held:
            raise ValueError(f"the last forward call through this cache stopped before its last layer: a model with "
                             f"fewer than {g.num_layers} layers ({self.made_for} is the cache's), or an interrupted "
                             "call; make the cache with the model it runs with, or call cache.reset()")
        else:
            return
        raise ValueError(f"this cache was made for another model ({self.made_for}) than the one it is used with "
                         f"({theirs}): make the cache with the model it runs with")

    def reset(self) -> None:
        """Empty the cache for a new prompt (same settings: auto mode starts in full mode again)."""
        super().reset()
        for layer in self.layers:  # transformers 5.2 zeroes the tensors but keeps their length: drop them
            if isinstance(layer, DynamicLayer) and layer.is_initialized:
                layer.keys = layer.values = None
                layer.is_initialized = False
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = 0
        self.positions = None
        for store in self.stores:
            store.reset()
        self.is_compressed = self.mode == "compressed"
        self.switched_at = 0 if self.is_compressed else None
        self.token_ids = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.token_ids = None
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]
        for store in self.stores:
            store.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.token_ids = None
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        for store in self.stores:
            store.batch_repeat_interleave(repeats)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.token_ids = None
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        for store in self.stores:
            store.reorder_cache(beam_idx)

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        if self.positions is not None:
            self.positions = self.positions[:, : self.layers[self.compressible[0]].recent_length()]

    def _record_positions(self, key_states, args, kwargs) -> None:
        """Keep the RoPE positions of the new tokens: the model's position ids where transformers passes them
        to the cache (5.24 and newer: exact with left padding), else their cache positions."""
        b, _, t, _ = key_states.shape
        extra = kwargs.get("kwargs") or {}
        pos = extra.get("position_ids", kwargs.get("position_ids"))
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] != t:
            cache_kwargs = args[0] if args and isinstance(args[0], dict) else {}
            pos = cache_kwargs.get("cache_position", extra.get("cache_position"))
            if not isinstance(pos, torch.Tensor) or pos.numel() != t:
                start = self.layers[self.compressible[0]].get_seq_length()
                pos = torch.arange(start, start + t, device=key_states.device)
            pos = pos.reshape(1, t)
        pos = pos.to(device=key_states.device, dtype=torch.long).expand(b, t)
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos], dim=1)

    def _records_positions(self) -> bool:
        """Whether the tokens' RoPE positions are kept (a codec that undoes RoPE needs them)."""
        return self.codec is not None and self.codec.needs_positions

    def _keep_positions(self, positions: torch.Tensor) -> None:
        """The positions of tokens just handed to the codec (its store keeps what it needs of them)."""

    # -- switching ------------------------------------------------------------------------------------------
    def seen_tokens(self) -> int:
        # FullCache has no compressible layer: its first full-attention layer counts (a sliding one holds its window)
        first = self.compressible[0] if self.compressible else next(
            (i for i, lay in enumerate(self.layers) if not getattr(lay, "is_sliding", False)), 0)
        return self.layers[first].get_seq_length()

    def _should_switch(self) -> bool:
        return self.switch.due(self.seen_tokens(), self.nbytes)

    @contextlib.contextmanager
    def deferred(self):
        """Compress nothing inside the block, and everything due at its end: a prompt fed in chunks attends to its
        own exact K/V, as in one call (:func:`echokv.generation.prefill` with ``exact_prompt``). Peak memory is
        then the full K/V of what the block feeds."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False
            if self.get_seq_length():
                self._after_forward()

    def _after_forward(self) -> None:
        if self._deferred:
            return
        if not self.is_compressed and self._should_switch():
            self.is_compressed, self.switched_at = True, self.seen_tokens()
        if self.is_compressed:
            self._flush()

    def compress(self) -> None:
        """Switch to compressed mode now: existing entries are converted and their memory freed (a codec that
        stores whole blocks, :attr:`~echokv.cache.codec.KVCodec.token_block`, keeps the last incomplete one exact)."""
        if not self.is_compressed:
            self.is_compressed, self.switched_at = True, self.seen_tokens()
        self._flush()

    def _flush(self) -> None:
        """Move every token older than the full window from the recent part into the group stores."""
        n = min((self.layers[i].recent_length() for i in self.compressible), default=0) - self.full_window
        n -= n % self.codec.token_block  # whole blocks only: the rest stays exact until a block is complete
        if n <= 0:
            return
        positions = None
        if self.positions is not None:
            positions, self.positions = self.positions[:, :n], self.positions[:, n:]
            self._keep_positions(positions)
        here = self.layers[self.compressible[0]].runs_on  # where the positions were recorded
        for gi, store in enumerate(self.stores):
            layers = [self.layers[i] for i in store.layers]
            keys = [store.move(lay.keys[:, :, :n], store.device) if lay.away else lay.keys[:, :, :n] for lay in layers]
            values = [store.move(lay.values[:, :, :n], store.device) if lay.away else lay.values[:, :, :n]
                      for lay in layers]
            extra = {}
            if self.codec.needs_start:
                extra["start"] = store.n_tokens
            if positions is not None and self.codec.needs_positions:
                extra["positions"] = store.move(positions, store.device) if store.device != here else positions
            store.append(self.codec.encode(gi, keys, values, **extra), n)
            for lay in layers:
                lay.drop_oldest(n)

    @property
    def mode_now(self) -> str:
        return "compressed" if self.is_compressed else "full"

    # -- memory accounting (:mod:`echokv.cache.accounting`) ----------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the tokens the cache holds now (recent K/V and stored tensors, without spare room)."""
        return accounting.nbytes(self)

    def full_nbytes(self) -> int:
        """Bytes a default DynamicCache would hold for the same tokens."""
        return accounting.full_nbytes(self)

    def reserved_nbytes(self) -> int:
        """Bytes of the memory blocks behind the cache's tensors: :meth:`nbytes` plus the spare room of
        the buffers that grow in place (and the bases of views, e.g. a sliding window's)."""
        return accounting.reserved_nbytes(self)

    def kept_fraction(self) -> float:
        return accounting.kept_fraction(self)

    def moved_bytes(self) -> int:
        """Bytes moved so far between the devices of layers and those of their groups (0 on one device)."""
        return sum(store.moved_bytes for store in self.stores)

    def memory_report(self) -> dict:
        return {
            "mode": self.mode_now,
            "switched_at": self.switched_at,
            "tokens": self.seen_tokens(),
            "cache_bytes": self.nbytes(),
            "reserved_bytes": self.reserved_nbytes(),
            "full_cache_bytes": self.full_nbytes(),
            "kept_fraction": self.kept_fraction(),
        }


class FullCache(CompressedCache):
    """The default dynamic cache (appending in place) with the same accounting interface; nothing is ever
    compressed (:meth:`compress` does nothing)."""

    def __init__(self, model):
        super().__init__(model, None, mode="full")

    def compress(self) -> None:
        pass

