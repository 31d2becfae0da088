"""A full engine's K/V stored as EchoKV-Q codes and restored as K/V (pure torch; the vLLM connector uses it): per
prompt ``kv.safetensors`` (per layer its blocks as :class:`~.pages.PageFormat` bytes, its sinks exact) and ``kv.json``
(the codec's and the file's sha256: a mismatch is refused, never used). vLLM's CPU cache is not token-major (its
``vec`` kernels keep keys as ``[head_dim, block_size]`` per block and head, ``amx`` packs both for tiles), so
:func:`probe` learns the layout from the engine's own write op.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifact import sha256_file
from ..codecs.headq import HeadQuantCodec
from ..util import atomic_dir
from .pages import PageFormat, gathered

FILES = ("kv.safetensors", "kv.json")


def probe(write, tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the engine's ``write(key, value, key_cache, value_cache, slots)`` puts token t, head h, channel i of a
    block: per kind int64 [tokens, heads, head_dim] offsets into the block's flat ``[heads * tokens * head_dim]``
    elements. Each element is written as its index in two parts below 256 (exact in every 16-bit float)."""
    n = tokens * heads * head_dim
    index = torch.arange(n).view(tokens, heads, head_dim)
    seen = []
    for part in (index % 256, index // 256):
        caches = [torch.full((1, heads, tokens, head_dim), -1.0, dtype=dtype) for _ in range(2)]
        write(part.to(dtype), part.to(dtype), *caches, torch.arange(tokens))
        seen.append([c.flatten().long() for c in caches])
    where = []
    for low, high in zip(*seen):
        got = high * 256 + low  # got[p]: the element written at offset p
        if not torch.equal(got.sort().values, torch.arange(n)):
            raise RuntimeError("the engine's cache write is not a permutation of its K/V (an unknown cache layout): "
                               "the EchoKV offload connector cannot read it")
        at = torch.empty(n, dtype=torch.long)
        at[got] = torch.arange(n)
        where.append(at.view(tokens, heads, head_dim))
    return where[0], where[1]


def read_slots(cache: torch.Tensor, where: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The K or V at ``slots`` of one kind's cache ``[blocks, heads, block_size, head_dim]``: [T, heads, head_dim]."""
    flat, size = cache.view(cache.shape[0], -1), cache.shape[2]
    return flat[(slots // size)[:, None, None], where[slots % size]]


def write_slots(cache: torch.Tensor, where: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    flat, size = cache.view(cache.shape[0], -1), cache.shape[2]
    flat[(slots // size)[:, None, None], where[slots % size]] = x.to(cache.dtype)


def encode(codec: HeadQuantCodec, layer: int, keys: torch.Tensor, values: torch.Tensor) -> dict:
    """A prompt's K/V of ``layer`` ([T, H, d], T a multiple of the codec's block) as tensors to store."""
    stored = codec.encode(codec.groups.index([layer]), [keys.transpose(0, 1)[None]], [values.transpose(0, 1)[None]])
    sink_k, sink_v = stored.pop("sink.k"), stored.pop("sink.v")
    fmt = PageFormat(codec.widths[layer], keys.shape[1])
    return {f"{layer}.pages": fmt.pack(stored), f"{layer}.sink.k": sink_k[0], f"{layer}.sink.v": sink_v[0]}


def decode(codec: HeadQuantCodec, layer: int, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V [T, H, d] that :func:`encode`'s tensors restore (what echokv's own cache reads from the same codes)."""
    sink_k = tensors[f"{layer}.sink.k"]
    fmt = PageFormat(codec.widths[layer], sink_k.shape[0])
    pages = tensors[f"{layer}.pages"]
    stored = gathered(fmt.blocks(pages), torch.arange(pages.shape[0]))
    stored["sink.k"], stored["sink.v"] = sink_k[None], tensors[f"{layer}.sink.v"][None]
    k, v = codec.decode(layer, stored)
    return k[0].transpose(0, 1), v[0].transpose(0, 1)


def save(folder, tensors: dict, codec_id: str, tokens: int) -> None:
    """Write a prompt's tensors to the new ``folder`` (complete or absent: written beside it, then renamed)."""
    with atomic_dir(folder, flag=None) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / FILES[0]))
        (tmp / FILES[1]).write_text(json.dumps({"codec": codec_id, "tokens": tokens,
                                                "sha256": sha256_file(tmp / FILES[0])}))


def check(folder, codec_id: str) -> str | None:
    """Why the stored ``folder`` cannot be used (one line), or None when it can."""
    folder = Path(folder)
    if not all((folder / f).is_file() for f in FILES):
        return f"{folder}: incomplete ({' and '.join(FILES)} expected)"
    meta = json.loads((folder / FILES[1]).read_text())
    if meta.get("codec") != codec_id:
        return f"{folder}: stored with another EchoKV-Q codec ({str(meta.get('codec'))[:12]}), not this engine's"
    if sha256_file(folder / FILES[0]) != meta.get("sha256"):
        return f"{folder / FILES[0]} does not match its checksum: changed or cut short"
    return None


def load(folder, codec_id: str) -> dict:
    """The tensors :func:`save` wrote (ValueError, one line, where :func:`check` refuses them)."""
    why = check(folder, codec_id)
    if why:
        raise ValueError(why)
    return load_file(str(Path(folder) / FILES[0]))
