"""Tensors that grow along the token axis in place, and one group's store of compressed tokens."""

from __future__ import annotations

import torch

# Spare room when a buffer grows: 1/SPARE_ROOM of its tokens, so at most 1/64 extra memory, and one reallocation
# (a copy of the whole tensor) per n/64 decode steps instead of one per step.
SPARE_ROOM = 64


def spare_room(n_tokens: int) -> int:
    """Tokens reserved beyond ``n_tokens`` when a buffer grows."""
    return n_tokens // SPARE_ROOM


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
            room = spare_room(end)
            if not room:  # one C++ call: a recent window below SPARE_ROOM tokens reallocates at every decode step,
                # and three Python-level slicings per layer cost 4x this (1.7 ms per SmolLM2 step)
                view = (torch.cat([current.to(new.dtype), new], -2).contiguous() if held
                        else new.clone(memory_format=torch.contiguous_format))  # never an alias of the caller's
                self.buffers[name] = (view, view)
                return view
            grown = new.new_empty(*new.shape[:-2], end + room, new.shape[-1])
            if held:
                grown[..., :start, :] = current
            buf = grown
        buf[..., start:end, :] = new
        view = buf[..., :end, :]
        self.buffers[name] = (buf, view)
        return view

    def track(self, name: str, tensor) -> None:
        """``name`` is now ``tensor``: unless that is the view returned last, its buffer is no longer needed."""
        entry = self.buffers.get(name)
        if entry is not None and entry[1] is not tensor:
            del self.buffers[name]

    def clear(self) -> None:
        self.buffers = {}


class GroupStore:
    """The compressed tokens of one group of layers: the codec's tensors (token axis -2), grown in place.

    Every :class:`~echokv.cache.layers.CompressedLayer` of the group references this one object; a layer
    decodes itself from it. Batch selection, repetition and beam reordering happen here once per group
    (:class:`~echokv.cache.compressed.CompressedCache` calls them), never once per layer.
    """

    def __init__(self, layers: list[int], device: torch.device | None = None):
        self.layers = list(layers)
        self.tensors: dict[str, torch.Tensor] = {}
        self.n_tokens = 0
        self.appender = Appender()
        #: where the group's tokens are encoded, stored and decoded (:func:`echokv.placement.group_device`)
        self.device = device
        #: bytes moved between this device and the devices of layers that run elsewhere
        self.moved_bytes = 0

    def move(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` on ``device``, its bytes counted (a layer of the group that runs on another device)."""
        self.moved_bytes += tensor.numel() * tensor.element_size()
        return tensor.to(device)

    def bridge(self, fn, device: torch.device):
        """The fast attention ``fn`` (run on this group's device) for a layer on ``device``: its queries, recent
        K/V and mask go here, the output goes back."""
        def run(q, k, v, mask, scaling):
            home = self.device
            mask = None if mask is None else self.move(mask, home)
            return self.move(fn(self.move(q, home), self.move(k, home), self.move(v, home), mask, scaling), device)

        return run

    def append(self, tensors: dict[str, torch.Tensor], n_tokens: int) -> None:
        for name, t in tensors.items():
            self.tensors[name] = self.appender.append(name, self.tensors.get(name), t)
        self.n_tokens += n_tokens

    def held(self) -> list[torch.Tensor]:
        """The tensors of the stored tokens (views into the buffers behind them)."""
        return list(self.tensors.values())

    def buffers(self) -> list[torch.Tensor]:
        return [buf for buf, _ in self.appender.buffers.values()]

    # the tensors are replaced by these: the buffers they were views of are no longer needed
    def _replace(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.appender.clear()

    def reset(self) -> None:
        self._replace({})
        self.n_tokens = 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace({k: v[indices, ...] for k, v in self.tensors.items()})

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace({k: v.repeat_interleave(repeats, dim=0) for k, v in self.tensors.items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._replace({k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.tensors.items()})
