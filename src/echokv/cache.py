"""A transformers cache that runs in full mode and switches to a compressed store on demand.

``CompressedCache`` is a :class:`transformers.DynamicCache` whose full-attention layers are
:class:`CompressedLayer` objects. In full mode they hold the same K/V tensors as transformers'
``DynamicLayer`` (logits are bit-identical to the default cache), appended in place
(:class:`GrowingLayer`) instead of copied by ``torch.cat`` at every step. Once compressed, every token older than
the optional full window W is handed to a :class:`KVCodec`, which keeps what it needs (EchoKV: the
retained heads) and gives the full K/V back when attention asks for them. Sliding-window layers keep
their own behaviour.

``EchoKVCache`` is this cache with the EchoKV codec. Baselines are other codecs.

Prefill: one ``model(...)`` call attends with the exact K/V of its own tokens; compression happens
after the call. :func:`prefill` feeds a long prompt in chunks so the cache compresses between chunks
and never holds a full cache for the whole prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .models import cache_kwarg, kv_geometry


class KVCodec(ABC):
    """How compressed tokens are stored. Stored tensors keep the token axis at dim -2."""

    #: full-attention layers this codec compresses
    layers: list[int]

    @abstractmethod
    def encode(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> dict[int, dict]:
        """Full K/V [B, H, T, d] of a block of tokens, for every layer -> stored tensors per layer."""

    @abstractmethod
    def decode(self, layer: int, stored: dict[int, dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full K/V [B, H, T_stored, d] of ``layer`` from everything stored (all layers)."""

    def fast_attention(self, layer: int, stored: dict[int, dict]):
        """Optional: fn(q, recent_k, recent_v, mask, scaling) -> attention output over the stored past
        and the recent tokens, without decoding; ``None`` when the codec has no such path."""
        return


def spare_room(n_tokens: int) -> int:
    """Tokens reserved beyond ``n_tokens`` when a buffer grows: at most 1/64 extra memory, and one
    reallocation (a copy of the whole tensor) per n/64 decode steps instead of one per step."""
    return n_tokens // 64


class Appender:
    """Tensors that grow along the token axis (dim -2) in place.

    ``append(name, current, new)`` returns ``cat([current, new], -2)`` as a view of a buffer with spare
    room, so a decode step writes one token where ``torch.cat`` copies everything held. ``current``
    must be the view returned last time for ``name`` to be extended in place; anything else (a fresh
    tensor, a crop, a reordered batch) is copied into a new buffer, so outside edits stay correct.
    """

    def __init__(self):
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (buffer, view)

    def append(self, name: str, current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        held = current is not None and current.dim() == new.dim()  # (DynamicLayer starts from a 1-d empty tensor)
        start = current.shape[-2] if held else 0
        end = start + new.shape[-2]
        entry = self.buffers.get(name)
        buf = entry[0] if entry is not None and entry[1] is current else None
        if buf is None or buf.shape[-2] < end:
            grown = new.new_empty(*new.shape[:-2], end + spare_room(end), new.shape[-1])
            if held:
                grown[..., :start, :] = current
            buf = grown
        buf[..., start:end, :] = new
        view = buf[..., :end, :]
        self.buffers[name] = (buf, view)
        return view

    def clear(self) -> None:
        self.buffers = {}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layer_tensors(layer) -> list[torch.Tensor]:
    """The tensors a cache layer holds (any transformers layer: its keys and values)."""
    if isinstance(layer, GrowingLayer):
        return layer.tensors()
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


class GrowingLayer(DynamicLayer):
    """transformers' DynamicLayer, appending in place: the same K/V tensors (values and shapes), so
    attention outputs are bit-identical, without copying the whole layer at every decode step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.appender = Appender()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self.appender.append("keys", self.keys, key_states)
        self.values = self.appender.append("values", self.values, value_states)
        return self.keys, self.values

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this layer holds (views into buffers where they grow in place)."""
        return [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]

    def drop_oldest(self, n_tokens: int) -> None:
        """Forget the ``n_tokens`` oldest tokens; their memory is released (the rest is copied)."""
        self.keys = self.keys[:, :, n_tokens:].clone()
        self.values = self.values[:, :, n_tokens:].clone()
        for name in ("keys", "values"):
            self.appender.buffers.pop(name, None)

    # the tensors are replaced by these: the buffers they were views of are no longer needed
    def reset(self) -> None:
        self.appender.clear()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.appender.clear()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.appender.clear()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.appender.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.appender.clear()


class CompressedLayer(GrowingLayer):
    """A GrowingLayer (the recent, uncompressed tokens) plus the codec's stored tensors."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stored: dict[str, torch.Tensor] = {}
        self.n_stored = 0

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.n_stored

    def recent_length(self) -> int:
        return super().get_seq_length()

    def append_stored(self, tensors: dict[str, torch.Tensor], n_tokens: int) -> None:
        for name, t in tensors.items():
            self.stored[name] = self.appender.append(f"stored.{name}", self.stored.get(name), t)
        self.n_stored += n_tokens

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + list(self.stored.values())

    def reset(self) -> None:
        self.stored, self.n_stored = {}, 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.recent_length():
            raise NotImplementedError("cannot crop into compressed tokens")
        super().crop(tokens_to_remove)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.stored = {k: v[indices, ...] for k, v in self.stored.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.stored = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.stored.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.stored = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.stored.items()}


class CompressedCache(DynamicCache):
    """Full cache until a switch; compressed by ``codec`` afterwards.

    Args:
        model: the model the cache is used with (for its layer layout).
        codec: what compressed tokens become.
        mode: ``"full"`` (until :meth:`compress` is called), ``"compressed"`` (from the first token),
            or ``"auto"`` (switch at ``switch_at_tokens`` or ``memory_budget_bytes``).
        switch_at_tokens: auto mode: compress once the context holds at least this many tokens.
        memory_budget_bytes: auto mode: compress once the cache would hold more than this many bytes.
        full_window: keep the most recent W tokens uncompressed (0: compress everything).
    """

    MODES = ("full", "compressed", "auto")
    # The fast path pays per query (scores against the group's latent); the explicit one pays once per
    # call (rebuilding the past). Measured on SmolLM2 at 4096 tokens: the fast path made 512-token prefill
    # chunks 4x slower than the explicit rebuild, so calls with more queries than this rebuild explicitly.
    FAST_MAX_QUERIES = 16

    def __init__(
        self,
        model,
        codec: KVCodec,
        mode: str = "auto",
        switch_at_tokens: int | None = None,
        memory_budget_bytes: int | None = None,
        full_window: int = 0,
        fast: bool = False,
    ):
        if mode not in self.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(self.MODES)}")
        if switch_at_tokens is not None and (not isinstance(switch_at_tokens, int) or switch_at_tokens < 1):
            raise ValueError(f"switch_at_tokens must be a positive integer, got {switch_at_tokens!r}")
        if memory_budget_bytes is not None and (
            not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 1
        ):
            raise ValueError(f"memory_budget_bytes must be a positive integer, got {memory_budget_bytes!r}")
        if not isinstance(full_window, int) or full_window < 0:
            raise ValueError(f"full_window must be a non-negative integer, got {full_window!r}")
        if mode == "auto" and switch_at_tokens is None and memory_budget_bytes is None:
            raise ValueError("mode 'auto' needs switch_at_tokens or memory_budget_bytes")
        super().__init__(config=model.config)
        self.geometry = kv_geometry(model)
        if len(self.layers) != self.geometry.num_layers:  # config without layer types: build them now
            self.layers = [DynamicLayer() for _ in range(self.geometry.num_layers)]
            self.layer_class_to_replicate = None
        for i, layer in enumerate(self.layers):  # same tensors as stock, appended in place
            if type(layer) is DynamicLayer:
                self.layers[i] = GrowingLayer()
        self.codec = codec
        self.compressible = sorted(codec.layers)
        for i in self.compressible:
            if type(self.layers[i]) is not GrowingLayer:
                raise ValueError(f"layer {i} is not a full-attention layer; the codec cannot compress it")
            self.layers[i] = CompressedLayer()
        self.mode = mode
        self.switch_at_tokens = switch_at_tokens
        self.memory_budget_bytes = memory_budget_bytes
        self.full_window = full_window
        self.is_compressed = mode == "compressed"
        self.switched_at: int | None = 0 if self.is_compressed else None
        self.fast = fast
        if fast:
            from . import attention

            attention.enable(model)  # same SDPA outputs; lets the fast path replace one layer's attention

    # -- the cache protocol ---------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states)
        if isinstance(layer, CompressedLayer) and layer.n_stored:
            stored = {i: self.layers[i].stored for i in self.compressible}
            fast = self.fast and key_states.shape[-2] <= self.FAST_MAX_QUERIES
            fn = self.codec.fast_attention(layer_idx, stored) if fast else None
            if fn is not None:
                from . import attention

                attention.defer(layer_idx, fn)
                if layer_idx == len(self.layers) - 1:
                    self._after_forward()
                return keys, values
            past_k, past_v = self.codec.decode(layer_idx, stored)
            keys = torch.cat([past_k.to(keys.dtype), keys], dim=-2)
            values = torch.cat([past_v.to(values.dtype), values], dim=-2)
        if layer_idx == len(self.layers) - 1:
            self._after_forward()
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    # -- switching ------------------------------------------------------------------------------
    def seen_tokens(self) -> int:
        return self.layers[self.compressible[0]].get_seq_length() if self.compressible else 0

    def _should_switch(self) -> bool:
        if self.mode != "auto":
            return False
        if self.switch_at_tokens is not None and self.seen_tokens() >= self.switch_at_tokens:
            return True
        return self.memory_budget_bytes is not None and self.nbytes() > self.memory_budget_bytes

    def _after_forward(self) -> None:
        if not self.is_compressed and self._should_switch():
            self.is_compressed, self.switched_at = True, self.seen_tokens()
        if self.is_compressed:
            self._flush()

    def compress(self) -> None:
        """Switch to compressed mode now: existing entries are converted and their memory freed."""
        if not self.is_compressed:
            self.is_compressed, self.switched_at = True, self.seen_tokens()
        self._flush()

    def _flush(self) -> None:
        """Move every token older than the full window from the recent part into the codec."""
        layers = [self.layers[i] for i in self.compressible]
        n = min((lay.recent_length() for lay in layers), default=0) - self.full_window
        if n <= 0:
            return
        keys = {i: lay.keys[:, :, :n] for i, lay in zip(self.compressible, layers)}
        values = {i: lay.values[:, :, :n] for i, lay in zip(self.compressible, layers)}
        stored = self.codec.encode(keys, values)
        for i, lay in zip(self.compressible, layers):
            lay.append_stored(stored[i], n)
            lay.drop_oldest(n)

    @property
    def mode_now(self) -> str:
        return "compressed" if self.is_compressed else "full"

    # -- memory accounting ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the tokens the cache holds now (recent K/V and stored tensors, without spare room)."""
        return sum(_nbytes(t) for lay in self.layers for t in _layer_tensors(lay))

    def full_nbytes(self) -> int:
        """Bytes a default DynamicCache would hold for the same tokens."""
        total = 0
        for lay in self.layers:
            keys = getattr(lay, "keys", None)
            if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
                continue
            b, h, _, d = keys.shape
            t = lay.get_seq_length() if isinstance(lay, CompressedLayer) else keys.shape[-2]
            total += 2 * b * h * t * d * keys.element_size()
        return total

    def reserved_nbytes(self) -> int:
        """Bytes of the memory blocks behind the cache's tensors: :meth:`nbytes` plus the spare room of
        the buffers that grow in place (and the bases of views, e.g. a sliding window's)."""
        blocks = {}
        for lay in self.layers:
            buffers = [buf for buf, _ in lay.appender.buffers.values()] if isinstance(lay, GrowingLayer) else []
            for t in _layer_tensors(lay) + buffers:
                storage = t.untyped_storage()
                blocks[storage.data_ptr()] = storage.nbytes()
        return sum(blocks.values())

    def kept_fraction(self) -> float:
        full = self.full_nbytes()
        return self.nbytes() / full if full else 1.0

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


class EchoCodec(KVCodec):
    """EchoKV: store the retained heads; rebuild the discarded ones with the reconstructor.

    The retained heads of a group are stored as one tensor [B, n_retained, T, d] on the group's first
    layer (the others hold views of it when decoding): the fast path reads a group's sources in one go.
    EchoKV-Hybrid stores the group's key latent [B, 1, T, r] there instead of retained key heads.
    """

    def __init__(self, reconstructor):
        self.recon = reconstructor
        self.layout = reconstructor.layout
        self.layers = list(self.layout.layers)
        self._plans = {}

    def encode(self, keys, values):
        out = {i: {} for i in self.layers}
        for gi, group in enumerate(self.layout.groups):
            for kind, full in (("k", keys), ("v", values)):
                if kind == "k" and self.layout.hybrid:
                    out[group[0]]["k"] = self.recon.encode_keys(gi, [keys[i] for i in group])
                    continue
                parts = [full[i][:, self.layout.retained_in_layer(kind, i)] for i in group]
                out[group[0]][kind] = torch.cat(parts, dim=1)
        return out

    def _retained(self, kind: str, group: list[int], stored) -> dict[int, torch.Tensor]:
        whole, views, start = stored[group[0]][kind], {}, 0
        for i in group:
            n = len(self.layout.retained_in_layer(kind, i))
            views[i] = whole[:, start : start + n]
            start += n
        return views

    def decode(self, layer, stored):
        group = self.layout.groups[self.layout.group_of(layer)]
        if self.layout.hybrid:
            k = self.recon.decode_keys(layer, stored[group[0]]["k"])
        else:
            k = self.recon.rebuild("k", layer, self._retained("k", group, stored))
        v = self.recon.rebuild("v", layer, self._retained("v", group, stored))
        return k, v

    def fast_attention(self, layer, stored):
        from .fast_attention import LayerPlan, attend

        if layer not in self._plans:
            self._plans[layer] = LayerPlan(self.recon, layer)
        plan, first = self._plans[layer], self.layout.groups[self.layout.group_of(layer)][0]
        gk, gv = stored[first]["k"], stored[first]["v"]
        return lambda q, k, v, mask, scaling: attend(plan, q, k, v, gk, gv, mask, scaling)


class EchoKVCache(CompressedCache):
    """EchoKV cache: ``EchoKVCache(model, artifact_dir_or_reconstructor, switch_at_tokens=4096)``.

    ``fast=True`` (the default where it applies) decodes compressed layers with
    :mod:`echokv.fast_attention` (switching the model to the output-identical ``echokv`` attention);
    ``fast=False`` rebuilds the discarded heads explicitly (the reference).
    """

    def __init__(self, model, artifact, mode: str | None = None, **kwargs):
        from .artifact import load
        from .reconstructor import Reconstructor

        recon = artifact if isinstance(artifact, Reconstructor) else load(artifact, model)
        param = next(model.parameters())
        recon.to(device=param.device)
        if mode is None:
            mode = "auto" if kwargs.get("switch_at_tokens") or kwargs.get("memory_budget_bytes") else "full"
        kwargs.setdefault("fast", getattr(model.config, "attn_logit_softcapping", None) is None)
        super().__init__(model, EchoCodec(recon), mode=mode, **kwargs)


@torch.no_grad()
def prefill(model, cache, input_ids, attention_mask=None, chunk_size: int = 512):
    """Feed ``input_ids`` through ``model`` in chunks with ``cache``; returns the last logits [B, V].

    Between chunks a compressing cache compresses, so peak memory stays near one chunk of full KV.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    logits = None
    start = cache.get_seq_length()
    for s in range(0, input_ids.shape[1], chunk_size):
        ids = input_ids[:, s : s + chunk_size]
        mask = None if attention_mask is None else attention_mask[:, : s + ids.shape[1]]
        pos = torch.arange(start + s, start + s + ids.shape[1], device=ids.device)
        kwargs = {"cache_position": pos}
        if mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        # only the last position's logits are used: skip the vocabulary projection of the others
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs,
                    **cache_kwarg(model, cache))
        logits = out.logits[:, -1]
    return logits
