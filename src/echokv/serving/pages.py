"""EchoKV-Q's codes in a serving engine's pages, read in place by the fused kernel (pure torch: tested in the main
environment; the vLLM backend uses it).

A *block* is :data:`~echokv.codecs.headq.TOKEN_BLOCK` tokens of one layer, coded together (keys share a scale and
zero per channel): ``block_bytes`` = 64 token rows (per kind and class the codes of every head, then the values'
scales and zeros) followed by the keys' per-channel scales and zeros. A page of the engine (``tokens`` tokens) holds
``tokens / 64`` blocks one after another. The kernel reads the gathered rows through strided views: nothing is
unpacked or widened outside it.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..cache.layers import FAST_MAX_QUERIES
from ..codecs.headq import KINDS, TOKEN_BLOCK, HeadQuantCodec


class PageFormat:
    """The byte layout of one layer's blocks (``widths``: ``{"k": ((16, n16), (8, n8), ...), "v": ...}``, ``heads``
    KV heads)."""

    def __init__(self, widths: dict, heads: int):
        self.widths, self.heads = widths, heads
        self.row: list[tuple] = []  # (stored name, offset, per-head entries, dtype) within a token row
        self.block: list[tuple] = []  # the same within a block's tail (keys' per-channel scales and zeros)
        row = tail = 0
        for kind in KINDS:
            for width, n in widths[kind]:
                if not n:
                    continue
                name = f"{kind}{width}"
                if width == 16:
                    self.row.append((name, row, n, torch.float16))
                    row += 2 * heads * n
                    continue
                self.row.append((name, row, n * width // 8, torch.uint8))
                row += heads * n * width // 8
                for part in (".s", ".z"):
                    if kind == "k":
                        self.block.append((name + part, tail, n, torch.float16))
                        tail += 2 * heads * n
                    else:
                        self.row.append((name + part, row, 1, torch.float16))
                        row += 2 * heads
        self.row_bytes = row + row % 2
        self.block_bytes = TOKEN_BLOCK * self.row_bytes + tail

    def pack(self, stored: dict) -> torch.Tensor:
        """uint8 [blocks, block_bytes] from :meth:`HeadQuantCodec.encode`'s tensors of whole blocks (batch 1)."""
        t = next(x for name, x in stored.items() if not name.startswith("sink")).shape[2]
        blocks = t // TOKEN_BLOCK
        rows = torch.zeros(t, self.row_bytes, dtype=torch.uint8)
        for name, off, k, dtype in self.row:
            x = stored[name][0].reshape(self.heads, t, k).transpose(0, 1).contiguous()  # [T, H, k]
            rows[:, off : off + self.heads * k * x.element_size()] = x.view(torch.uint8).reshape(t, -1)
        out = [rows.view(blocks, -1)]
        for name, _, k, _ in self.block:
            out.append(stored[name][0].transpose(0, 1).contiguous().view(torch.uint8).reshape(blocks, -1))
        return torch.cat(out, dim=1)

    def stored(self, tokens: torch.Tensor, tails: torch.Tensor) -> dict:
        """The codec's stored tensors (batch 1, as :meth:`HeadQuantCodec.encode` names and shapes them) as views of
        gathered ``tokens`` uint8 [T, row_bytes] and ``tails`` [blocks, block_bytes - 64 row_bytes]."""
        out = {}
        t, h = tokens.shape[0], self.heads
        for name, off, k, dtype in self.row:
            size = 2 if dtype == torch.float16 else 1
            out[name] = tokens[:, off : off + h * k * size].view(dtype).view(t, h, k).transpose(0, 1)[None]
        for name, off, k, _ in self.block:
            out[name] = tails[:, off : off + 2 * h * k].view(torch.float16).view(-1, h, k).transpose(0, 1)[None]
        return out


class Pages:
    """One layer's engine cache ``[pages, tokens, chunk]`` uint8 seen as blocks of ``fmt``."""

    def __init__(self, cache: torch.Tensor, fmt: PageFormat):
        pages, self.tokens = cache.shape[0], cache.shape[1]
        self.per_page = self.tokens // TOKEN_BLOCK
        flat = cache.view(pages, -1)[:, : self.per_page * fmt.block_bytes].view(pages, self.per_page, -1)
        split = TOKEN_BLOCK * fmt.row_bytes
        self.fmt, self.rows, self.tails = fmt, flat[..., :split], flat[..., split:]

    def where(self, block_table: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, slot in page) of a sequence's blocks ``first .. first + count``."""
        j = torch.arange(first, first + count)
        return block_table[j // self.per_page].long(), j % self.per_page

    def write(self, block_table: torch.Tensor, first: int, packed: torch.Tensor) -> None:
        page, slot = self.where(block_table, first, packed.shape[0])
        split = self.rows.shape[-1]
        self.rows[page, slot] = packed[:, :split]
        self.tails[page, slot] = packed[:, split:]

    def read(self, block_table: torch.Tensor, count: int) -> dict:
        """The stored tensors of a sequence's first ``count`` blocks (one gather of their bytes)."""
        page, slot = self.where(block_table, 0, count)
        tokens = self.rows[page, slot].view(count * TOKEN_BLOCK, -1)
        return self.fmt.stored(tokens, self.tails[page, slot])


def page_bytes(widths: dict, heads: int, tokens: int) -> int:
    """Bytes per token of an engine page of ``tokens`` tokens (a multiple of the block), even (vLLM's specs count
    K and V halves)."""
    if tokens % TOKEN_BLOCK:
        raise ValueError(f"the engine's block size ({tokens}) must be a multiple of EchoKV-Q's block of "
                         f"{TOKEN_BLOCK} tokens: pass --block-size {TOKEN_BLOCK * max(1, tokens // TOKEN_BLOCK)}")
    need = tokens // TOKEN_BLOCK * PageFormat(widths, heads).block_bytes
    per = -(-need // tokens)
    return per + per % 2


class Sequence:
    """One sequence's exact tokens beside its pages, per layer: the sinks' copies (kept when its first block is
    coded) and the block being filled (fewer than 64 tokens)."""

    def __init__(self):
        self.sinks: dict[int, tuple] = {}
        self.filling: dict[int, tuple] = {}
        self.step = 0  # the engine step that last touched it


def attend(codec: HeadQuantCodec, layer: int, pages: Pages, seq: Sequence, block_table: torch.Tensor, past: int,
           q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """One sequence's attention in ``layer`` for this call's tokens (positions ``past ..``; q [n, Hq, d], k/v
    [n, H, d]) over its coded blocks, its exact tokens and these, as echokv's own cache reads them (exact within
    a call, blocks coded after it); then these tokens are stored: whole blocks coded into ``pages``, the rest kept
    exact in ``seq``. Returns [n, Hq, d]."""
    n, hq, d = q.shape
    h = k.shape[1]
    coded, keep = divmod(past, TOKEN_BLOCK)
    new_k, new_v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, n, d]
    if keep:
        fk, fv = seq.filling[layer]
        new_k, new_v = torch.cat([fk[:, :, :keep], new_k], dim=2), torch.cat([fv[:, :, :keep], new_v], dim=2)
    if coded and n <= FAST_MAX_QUERIES and codec._path_on(q.device) == "cpp":  # the fused kernel, pages in place
        stored = pages.read(block_table, coded)
        sink_k, sink_v = seq.sinks[layer]
        w = codec.widths[layer]
        args = kernels.prepared(codec._classes(stored, "k"), codec._classes(stored, "v"), w["k"], w["v"])
        codes = torch.ones(1, coded * TOKEN_BLOCK, dtype=torch.bool)
        codes[:, : sink_k.shape[2]] = False  # the sinks' exact copies are read instead
        rep = hq // h
        rows = q.view(n, h, rep, d).permute(1, 2, 0, 3).reshape(1, h, rep * n, d)  # rows (copy, token)
        mask = None
        if n > 1:  # row (r, t) sees the sinks, the block being filled and this call's tokens up to t
            te = sink_k.shape[2] + keep + n
            mask = (torch.arange(te) <= te - n + torch.arange(n)[:, None]).repeat(rep, 1)[None]
        ku, _, vu, _ = codec._read(layer, q.device)
        k_mean, v_mean = codec._step_read(layer, q.device)
        out = kernels.attend_step(rows, scaling, ku, k_mean, args, codes, sink_k, sink_v, new_k, new_v, mask, vu,
                                  v_mean)
        out = out[0].view(h, rep, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
    else:  # no coded block yet, or a prefill chunk: the coded blocks rebuilt (the explicit path), then SDPA
        keys, values = new_k, new_v
        if coded:
            stored = pages.read(block_table, coded)
            stored["sink.k"], stored["sink.v"] = seq.sinks[layer]
            past_k, past_v = codec.decode(layer, stored)
            keys, values = torch.cat([past_k.to(k.dtype), keys], dim=2), torch.cat([past_v.to(v.dtype), values], dim=2)
        t = keys.shape[2]
        mask = torch.arange(t) <= t - n + torch.arange(n)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                               scale=scaling, enable_gqa=hq > h)
        out = out[0].transpose(0, 1)
    full = new_k.shape[2] // TOKEN_BLOCK * TOKEN_BLOCK
    if full:
        stored = codec.encode(codec.groups.index([layer]), [new_k[:, :, :full]], [new_v[:, :, :full]],
                              start=coded * TOKEN_BLOCK)
        if not coded:
            seq.sinks[layer] = (stored.pop("sink.k"), stored.pop("sink.v"))
        pages.write(block_table, coded, pages.fmt.pack(stored))
    rest = new_k.shape[2] - full
    if rest:
        if layer not in seq.filling:
            seq.filling[layer] = (new_k.new_empty(1, h, TOKEN_BLOCK, d), new_v.new_empty(1, h, TOKEN_BLOCK, d))
        fk, fv = seq.filling[layer]
        fk[:, :, :rest], fv[:, :, :rest] = new_k[:, :, full:], new_v[:, :, full:]
    return out
