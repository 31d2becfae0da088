"""A mix artifact's stored representation of K/V as bytes: one row per token and group of layers.

:class:`~echokv.codecs.mix.MixCodec` stores a group's tokens as a few tensors whose token axis is dim -2 (codes,
float16 scales and zero-points, float16 components, int32 positions). Every one of them holds a fixed number of
bytes per token, so a token's share of all of them is one row of bytes (:class:`RowFormat`). A serving engine
keeps rows where it would keep K/V (the vLLM plugin: one row per token in the cache block of the group's layers),
and offloaded K/V travels as rows (:class:`KVSerde`): the bytes are the artifact's kept fraction of the full K/V,
and what comes back is what echokv's own cache rebuilds from the same K/V.
"""

from __future__ import annotations

import torch

from ..codecs.mix import MixCodec
from ..mixes import Mixes


class RowFormat:
    """Where each stored tensor of one group lies in a token's row: ``fields`` (name, dtype, elements per token),
    in order; stored tensors are ``[B, 1, T, n]`` (the codec's shapes), rows ``[B, T, nbytes]`` uint8."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]]):
        self.fields = fields
        self.sizes = [n * dtype.itemsize for _, dtype, n in fields]
        self.nbytes = sum(self.sizes)

    @classmethod
    def probe(cls, codec: MixCodec, group: int) -> RowFormat:
        """The format of ``group``, read off the codec's output for one token."""
        h, d = codec.h, codec.d
        zeros = [torch.zeros(1, h, 1, d) for _ in codec.groups[group]]
        pos = torch.zeros(1, 1, dtype=torch.long) if codec.needs_positions else None
        stored = codec.encode(group, zeros, zeros, positions=pos)
        return cls([(name, t.dtype, t.shape[-1]) for name, t in stored.items()])

    def pack(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        pieces = [stored[name][:, 0].contiguous().view(torch.uint8) for name, _, _ in self.fields]
        return torch.cat(pieces, dim=-1)

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for (name, dtype, _), size in zip(self.fields, self.sizes):
            out[name] = rows[..., start : start + size].clone(memory_format=torch.contiguous_format).view(dtype)[:, None]
            start += size
        return out


class KVSerde:
    """Full K/V <-> the stored rows of a mix artifact (``mixes``) for ``model`` (whose RoPE and dtype the codec
    uses: the model itself, or :func:`echokv.serving.rope.RopeHost` where only its config is at hand)."""

    def __init__(self, mixes: Mixes, model):
        if not isinstance(mixes, Mixes):
            raise TypeError(f"KVSerde needs a mix or heads artifact (retained components), got {type(mixes).__name__}")
        self.codec = MixCodec(mixes, model)
        self.layout = mixes.layout
        self.formats = [RowFormat.probe(self.codec, g) for g in range(len(self.codec.groups))]

    @property
    def token_bytes(self) -> int:
        """Stored bytes per token, every group."""
        return sum(f.nbytes for f in self.formats)

    def full_token_bytes(self, element_bytes: int) -> int:
        """Bytes per token of the full K/V of the artifact's layers, ``element_bytes`` per element."""
        return 2 * len(self.layout.layers) * self.layout.num_kv_heads * self.layout.head_dim * element_bytes

    # -- one group (what an engine's cache does per step) --------------------------------------------------------
    def encode_rows(self, group: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                    positions: torch.Tensor | None) -> torch.Tensor:
        """Post-RoPE keys and values [B, H, T, d] of the group's layers (in order), positions [B, T] -> rows."""
        return self.formats[group].pack(self.codec.encode(group, keys, values, positions=positions))

    def decode_layer(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [B, T, nbytes] of the layer's group -> the layer's rebuilt K (post-RoPE) and V [B, H, T, d]."""
        group = self.layout.group_of(layer)
        return self.codec.decode(layer, self.formats[group].unpack(rows))

    # -- a block of tokens as bytes (offloading) -----------------------------------------------------------------
    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> bytes:
        """A block of full K/V [L, T, H, d] (the artifact's layers, in order; keys after RoPE) at token
        ``positions`` [T] -> bytes: every group's rows, group after group."""
        n_layers = len(self.layout.layers)
        if keys.dim() != 4 or keys.shape != values.shape or keys.shape[0] != n_layers:
            raise ValueError(f"keys and values must both be [layers={n_layers}, tokens, heads, head_dim], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if positions.shape != (keys.shape[1],):
            raise ValueError(f"positions must be [tokens={keys.shape[1]}], got {tuple(positions.shape)}")
        index = {layer: i for i, layer in enumerate(self.layout.layers)}
        pos = positions.long()[None]
        out = []
        for g, layers in enumerate(self.codec.groups):
            ks = [keys[index[layer]].transpose(0, 1)[None] for layer in layers]
            vs = [values[index[layer]].transpose(0, 1)[None] for layer in layers]
            out.append(self.encode_rows(g, ks, vs, pos)[0])
        return b"".join(rows.numpy().tobytes() for rows in out)

    def decode(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """Bytes from :meth:`encode` -> rebuilt K (post-RoPE) and V [L, T, H, d]."""
        if len(data) % self.token_bytes:
            raise ValueError(f"{len(data)} bytes are not a whole number of tokens ({self.token_bytes} bytes each)")
        t = len(data) // self.token_bytes
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        keys, values, start = [], [], 0
        for g, fmt in enumerate(self.formats):
            rows = flat[start : start + t * fmt.nbytes].view(1, t, fmt.nbytes)
            start += t * fmt.nbytes
            for layer in self.codec.groups[g]:
                k, v = self.decode_layer(layer, rows)
                keys.append((layer, k[0].transpose(0, 1)))
                values.append((layer, v[0].transpose(0, 1)))
        order = {layer: i for i, layer in enumerate(self.layout.layers)}
        keys.sort(key=lambda x: order[x[0]])
        values.sort(key=lambda x: order[x[0]])
        return torch.stack([k for _, k in keys]), torch.stack([v for _, v in values])
