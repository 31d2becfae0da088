"""Bytes of any transformers cache: transformers' DynamicCache and QuantizedCache, echokv's caches, a
DynamicCache that kvpress compressed.

* :func:`nbytes`: the tokens the cache holds now (echokv: the recent K/V and every group's stored tensors,
  each store counted once), without spare room;
* :func:`reserved_nbytes`: the memory blocks behind those tensors (spare room of buffers that grow in place,
  the bases of views);
* :func:`full_nbytes`: what a default DynamicCache would hold for the same tokens;
* :func:`kept_fraction`: ``nbytes / full_nbytes``.

Quantized layers keep their data in backend objects (a tuple, a dict, a tensor subclass): every tensor found
in them counts, a tensor subclass by the plain tensors it is made of.
"""

from __future__ import annotations

import torch

_QUANTIZED = ("_quantized_keys", "_quantized_values")


def _tensors(obj, flatten: bool = True) -> list[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or a tuple/list/dict of them); with ``flatten``, a tensor subclass by
    the plain tensors it is made of."""
    if isinstance(obj, torch.Tensor):
        if flatten and type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return [t for name in names for t in _tensors(getattr(obj, name))]
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in _tensors(x, flatten)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x, flatten)]
    return []


def _stores(cache) -> list:
    """The distinct group stores the cache's layers reference."""
    seen = {}
    for layer in cache.layers:
        store = getattr(layer, "store", None)
        if store is not None:
            seen.setdefault(id(store), store)
    return list(seen.values())


def held(cache) -> list[torch.Tensor]:
    """Every tensor of cached tokens, each once."""
    out = []
    for layer in cache.layers:
        out += _tensors([getattr(layer, "keys", None), getattr(layer, "values", None)])
        out += _tensors([getattr(layer, name, None) for name in _QUANTIZED])
    for store in _stores(cache):
        out += store.held()
    return out


def nbytes(cache) -> int:
    return sum(t.nbytes for t in held(cache))


def reserved_nbytes(cache) -> int:
    blocks = {}
    extra = [buf for layer in cache.layers if hasattr(layer, "buffers") for buf in layer.buffers()]
    extra += [buf for store in _stores(cache) for buf in store.buffers()]
    for t in held(cache) + extra:
        storage = t.untyped_storage()
        blocks[storage.data_ptr()] = storage.nbytes()
    return sum(blocks.values())


def full_nbytes(cache, tokens: int | None = None) -> int:
    """Bytes of a default DynamicCache holding the same tokens (``tokens``: that many in every layer, for a cache
    that dropped some, as kvpress's presses do).

    A layer holds ``get_seq_length()`` tokens (stored and recent ones, quantized ones), except a sliding-window
    layer, which holds its window as a default cache does.
    """
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        shaped = [t for t in _tensors([keys] + [getattr(layer, name, None) for name in _QUANTIZED], flatten=False)
                  if t.dim() == 4]
        if not isinstance(keys, torch.Tensor) or not shaped:
            continue
        b, h, held_tokens, d = shaped[0].shape
        if tokens is not None:
            n = tokens
        elif getattr(layer, "is_sliding", False):
            n = held_tokens
        else:
            n = layer.get_seq_length()
        total += 2 * b * h * n * d * keys.dtype.itemsize
    return total


def kept_fraction(cache) -> float:
    full = full_nbytes(cache)
    return nbytes(cache) / full if full else 1.0
