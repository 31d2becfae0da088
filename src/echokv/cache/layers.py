"""Cache layers on transformers' per-layer protocol: one that appends in place, and one whose older tokens
live in its group's :class:`~echokv.cache.store.GroupStore`."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .. import attention
from .codec import KVCodec
from .store import Appender, GroupStore

# The fast path pays per query (scores against the group's latent); the explicit one pays once per call
# (rebuilding the past). Measured on SmolLM2 at 4096 tokens: the fast path made 512-token prefill chunks 4x
# slower than the explicit rebuild, so calls with more queries than this rebuild explicitly.
FAST_MAX_QUERIES = 16


def _growing(name: str) -> property:
    """A layer tensor that grows in place. Every edit from outside (a crop, a batch selection, a beam
    reordering, a reset, an offload) assigns another tensor, and the buffer behind the old one is released."""

    def get(self):
        return self.__dict__.get(name)

    def set(self, tensor):
        self.appender.track(name, tensor)
        self.__dict__[name] = tensor

    return property(get, set)


class GrowingLayer(DynamicLayer):
    """transformers' DynamicLayer, appending in place: the same K/V tensors (values and shapes), so
    attention outputs are bit-identical, without copying the whole layer at every decode step."""

    keys = _growing("keys")
    values = _growing("values")

    def __init__(self, **kwargs):
        self.appender = Appender()
        super().__init__(**kwargs)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self.appender.append("keys", self.keys, key_states)
        self.values = self.appender.append("values", self.values, value_states)
        return self.keys, self.values

    def held(self) -> list[torch.Tensor]:
        """The tensors this layer holds (views into buffers where they grow in place)."""
        return [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]

    def buffers(self) -> list[torch.Tensor]:
        return [buf for buf, _ in self.appender.buffers.values()]

    def drop_oldest(self, n_tokens: int) -> None:
        """Forget the ``n_tokens`` oldest tokens; their memory is released (the rest is copied)."""
        self.keys = self.keys[:, :, n_tokens:].clone()
        self.values = self.values[:, :, n_tokens:].clone()


class CompressedLayer(GrowingLayer):
    """A GrowingLayer (the recent, uncompressed tokens) plus a reference to its group's store.

    ``update`` returns the full K/V: the stored tokens decoded by the codec, then the recent ones. With
    ``fast_for`` (the model's config ids, see :func:`~echokv.attention.in_scope`) and inside the
    echokv attention scope, a call of at most :data:`FAST_MAX_QUERIES` queries hands the codec's fast
    attention to the attention call instead, and returns the recent tokens only.
    """

    def __init__(self, layer_idx: int, store: GroupStore, codec: KVCodec, fast_for: frozenset | None = None,
                 device: torch.device | None = None):
        super().__init__()
        self.layer_idx, self.store, self.codec, self.fast_for = layer_idx, store, codec, fast_for
        #: the device this layer runs on; when it is not its group's (``store.device``), tensors move between them
        #: (not ``device``: transformers' layers set that to their tensors' device)
        self.runs_on = device

    @property
    def away(self) -> bool:
        return self.runs_on is not None and self.store.device is not None and self.runs_on != self.store.device

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.store.n_tokens

    def recent_length(self) -> int:
        return super().get_seq_length()

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        if not self.store.n_tokens:
            return keys, values
        fast = self.fast_for is not None and key_states.shape[-2] <= FAST_MAX_QUERIES
        if fast and attention.in_scope(self.fast_for):
            fn = self.codec.fast_attention(self.layer_idx, self.store.tensors)
            if fn is not None:
                attention.hand_off(self.layer_idx, self.store.bridge(fn, self.runs_on) if self.away else fn)
                return keys, values
        past_k, past_v = self.codec.decode(self.layer_idx, self.store.tensors)
        if self.away:  # decoded on the group's device
            past_k, past_v = self.store.move(past_k, self.runs_on), self.store.move(past_v, self.runs_on)
        keys = torch.cat([past_k.to(keys.dtype), keys], dim=-2)
        return keys, torch.cat([past_v.to(values.dtype), values], dim=-2)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens: a negative count (transformers 5.2 may also pass the length to keep). Here,
        not in DynamicLayer.crop, whose count includes the stored tokens in 5.2."""
        remove = -tokens_to_remove if tokens_to_remove < 0 else self.get_seq_length() - tokens_to_remove
        if remove <= 0 or not self.is_initialized:
            return
        if remove > self.recent_length():
            raise NotImplementedError("cannot crop into compressed tokens")
        self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]
