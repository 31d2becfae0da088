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
from ..codecs.headq import KINDS, SINK_TOKENS, TOKEN_BLOCK, HeadQuantCodec


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
        # a whole number of even bytes per token, so that an engine page is its blocks back to back, and block j of
        # the cache sits at j * block_bytes (the kernel's block table indexes them)
        self.block_bytes = -(-(TOKEN_BLOCK * self.row_bytes + tail) // (2 * TOKEN_BLOCK)) * 2 * TOKEN_BLOCK

    def pack(self, stored: dict) -> torch.Tensor:
        """uint8 [blocks, block_bytes] from :meth:`HeadQuantCodec.encode`'s tensors of whole blocks (batch 1)."""
        t = next(x for name, x in stored.items() if not name.startswith("sink")).shape[2]
        blocks = t // TOKEN_BLOCK
        out = torch.zeros(blocks, self.block_bytes, dtype=torch.uint8)
        rows = out[:, : TOKEN_BLOCK * self.row_bytes].view(blocks, TOKEN_BLOCK, self.row_bytes)
        for name, off, k, _ in self.row:
            x = stored[name][0].reshape(self.heads, t, k).transpose(0, 1).contiguous()  # [T, H, k]
            rows[..., off : off + self.heads * k * x.element_size()] = x.view(torch.uint8).reshape(
                blocks, TOKEN_BLOCK, -1)
        tails = out[:, TOKEN_BLOCK * self.row_bytes :]
        for name, off, k, _ in self.block:
            tails[:, off : off + 2 * self.heads * k] = stored[name][0].transpose(0, 1).contiguous().view(
                torch.uint8).reshape(blocks, -1)
        return out

    def blocks(self, cache: torch.Tensor) -> dict:
        """The stored tensors of every block of ``cache`` (uint8, ``block_bytes`` per block, contiguous), as views,
        block-major: codes [P, H, 64, *], values' scales and zeros [P, H, 64, 1], keys' [P, H, 1, n]."""
        flat = cache.view(-1, self.block_bytes)
        rows = flat[:, : TOKEN_BLOCK * self.row_bytes].view(-1, TOKEN_BLOCK, self.row_bytes)
        tails = flat[:, TOKEN_BLOCK * self.row_bytes :]
        h, out = self.heads, {}
        for name, off, k, dtype in self.row:
            size = 2 if dtype == torch.float16 else 1
            x = rows[..., off : off + h * k * size].view(dtype)
            out[name] = x.view(-1, TOKEN_BLOCK, h, k).transpose(1, 2)
        for name, off, k, _ in self.block:
            out[name] = tails[:, off : off + 2 * h * k].view(torch.float16).view(-1, h, 1, k)
        return out


def gathered(blocks: dict, index: torch.Tensor) -> dict:
    """The blocks ``index`` of :meth:`PageFormat.blocks` as one sequence, in the codec's batch-1 layout (a copy)."""
    out = {}
    for name, t in blocks.items():
        x = t[index]  # [n, H, 64 or 1, *]
        out[name] = x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])  # [1, H, n * 64 (keys' scales: n), *]
    return out


class Pages:
    """One layer's engine cache ``[pages, tokens, chunk]`` uint8 (:func:`page_bytes` per token) seen as blocks of
    ``fmt``: block ``page * tokens / 64 + j`` is the page's j-th. Beside it, :class:`Exact`: the layer's exact
    tokens of every sequence."""

    def __init__(self, cache: torch.Tensor, fmt: PageFormat):
        self.tokens = cache.shape[1]
        self.per_page = self.tokens // TOKEN_BLOCK
        self.fmt, self.cache = fmt, cache.view(-1, fmt.block_bytes)
        self.blocks = fmt.blocks(cache)
        self.exact = Exact()
        self.args = None  # the kernel's class arguments over self.blocks (built on first use)

    def index(self, block_table: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """The block numbers of a sequence's blocks ``first .. first + count`` (int64)."""
        j = torch.arange(first, first + count)
        return block_table[j // self.per_page].long() * self.per_page + j % self.per_page

    def write(self, block_table: torch.Tensor, first: int, packed: torch.Tensor) -> None:
        self.cache[self.index(block_table, first, packed.shape[0])] = packed

    def read(self, block_table: torch.Tensor, count: int) -> dict:
        """The stored tensors of a sequence's first ``count`` blocks (a copy, the codec's layout)."""
        return gathered(self.blocks, self.index(block_table, 0, count))


class Exact:
    """One layer's exact tokens of every sequence, by slot: the block being filled (fewer than 64 tokens,
    ``fill_k/fill_v`` [S, H, 64, d]) and the sinks' copies (``sink_k/sink_v`` [S, H, sinks, d], kept when the first
    block is coded). One tensor per kind, so that a decode step gathers a batch's in one call."""

    def __init__(self):
        self.fill_k = self.fill_v = self.sink_k = self.sink_v = None

    def reserve(self, slot: int, like: torch.Tensor, sinks: int = SINK_TOKENS) -> None:
        """Room for ``slot`` (its tensors shaped and typed like ``like`` [*, H, *, d])."""
        if self.fill_k is not None and slot < self.fill_k.shape[0]:
            return
        n = max(2 * slot, 8)
        h, d = like.shape[1], like.shape[-1]
        grown = [like.new_zeros(n, h, t, d) for t in (TOKEN_BLOCK, TOKEN_BLOCK, sinks, sinks)]
        if self.fill_k is not None:
            for new, old in zip(grown, (self.fill_k, self.fill_v, self.sink_k, self.sink_v)):
                new[: old.shape[0]] = old
        self.fill_k, self.fill_v, self.sink_k, self.sink_v = grown


def page_bytes(widths: dict, heads: int, tokens: int) -> int:
    """Bytes per token of an engine page of ``tokens`` tokens (a multiple of the block): its blocks back to back."""
    if tokens % TOKEN_BLOCK:
        raise ValueError(f"the engine's block size ({tokens}) must be a multiple of EchoKV-Q's block of "
                         f"{TOKEN_BLOCK} tokens: pass --block-size {TOKEN_BLOCK * max(1, tokens // TOKEN_BLOCK)}")
    return PageFormat(widths, heads).block_bytes // TOKEN_BLOCK


class Sequence:
    """One sequence of an engine: its slot in every layer's :class:`Exact`."""

    def __init__(self, slot: int):
        self.slot = slot
        self.step = 0  # the engine step that last touched it


def _kernel_args(codec: HeadQuantCodec, layer: int, pages: Pages) -> tuple:
    """The kernel's class arguments over every block of ``pages`` (built once per cache tensor)."""
    if pages.args is None:
        w = codec.widths[layer]
        pages.args = kernels.prepared(codec._classes(pages.blocks, "k"), codec._classes(pages.blocks, "v"), w["k"],
                                      w["v"])
    return pages.args


def _fused(codec, layer, pages, rows, table, codes, sink_k, sink_v, exact_k, exact_v, mask, scaling):
    ku, k_mean, vu, v_mean = codec._read(layer, rows.device)
    return kernels.attend_step(rows, scaling, ku, k_mean, _kernel_args(codec, layer, pages), codes, sink_k, sink_v,
                               exact_k, exact_v, mask, vu, v_mean, table=table)


def attend(codec: HeadQuantCodec, layer: int, pages: Pages, seq: Sequence, block_table: torch.Tensor, past: int,
           q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """One sequence's attention in ``layer`` for this call's tokens (positions ``past ..``; q [n, Hq, d], k/v
    [n, H, d]) over its coded blocks, its exact tokens and these, as echokv's own cache reads them (exact within
    a call, blocks coded after it); then these tokens are stored: whole blocks coded into ``pages``, the rest kept
    exact in ``pages.exact``. Returns [n, Hq, d]."""
    n, hq, d = q.shape
    h = k.shape[1]
    coded, keep = divmod(past, TOKEN_BLOCK)
    ex, i = pages.exact, seq.slot
    new_k, new_v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, n, d]
    ex.reserve(i, new_k)
    if keep:
        new_k = torch.cat([ex.fill_k[i : i + 1, :, :keep], new_k], dim=2)
        new_v = torch.cat([ex.fill_v[i : i + 1, :, :keep], new_v], dim=2)
    if coded and n <= FAST_MAX_QUERIES and codec._path_on(q.device) == "cpp":  # the fused kernel, pages in place
        sink_k, sink_v = ex.sink_k[i : i + 1], ex.sink_v[i : i + 1]
        codes = codec._sink_mask(1, coded * TOKEN_BLOCK, sink_k.shape[2], q.device)  # the sinks' exact copies read
        rep = hq // h
        rows = q.view(n, h, rep, d).permute(1, 2, 0, 3).reshape(1, h, rep * n, d)  # rows (copy, token)
        mask = None
        if n > 1:  # row (r, t) sees the sinks, the block being filled and this call's tokens up to t
            te = sink_k.shape[2] + keep + n
            mask = (torch.arange(te) <= te - n + torch.arange(n)[:, None]).repeat(rep, 1)[None]
        out = _fused(codec, layer, pages, rows, pages.index(block_table, 0, coded)[None], codes, sink_k, sink_v,
                     new_k, new_v, mask, scaling)
        out = out[0].view(h, rep, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
    else:  # no coded block yet, or a prefill chunk: the coded blocks rebuilt (the explicit path), then SDPA
        keys, values = new_k, new_v
        if coded:
            stored = pages.read(block_table, coded)
            stored["sink.k"], stored["sink.v"] = ex.sink_k[i : i + 1], ex.sink_v[i : i + 1]
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
            sink_k, sink_v = stored.pop("sink.k"), stored.pop("sink.v")
            ex.sink_k[i, :, : sink_k.shape[2]], ex.sink_v[i, :, : sink_v.shape[2]] = sink_k[0], sink_v[0]
        pages.write(block_table, coded, pages.fmt.pack(stored))
    rest = new_k.shape[2] - full
    if rest:
        ex.fill_k[i, :, :rest], ex.fill_v[i, :, :rest] = new_k[0, :, full:], new_v[0, :, full:]
    return out


def batch_blocks(pages: Pages, tables: list[torch.Tensor], coded: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's block table [B, max coded] (int64) and its coded tokens' mask [B, 64 max coded] (the sinks' codes
    masked: their exact copies are read). The same for every layer of one engine step."""
    b, most = len(tables), max(coded)
    table = torch.zeros(b, most, dtype=torch.long)
    codes = torch.zeros(b, most * TOKEN_BLOCK, dtype=torch.bool)
    for i, t in enumerate(tables):
        table[i, : coded[i]] = pages.index(t, 0, coded[i])
        codes[i, SINK_TOKENS : coded[i] * TOKEN_BLOCK] = True
    return table, codes


def decode(codec: HeadQuantCodec, layer: int, pages: Pages, seqs: list[Sequence], tables: list[torch.Tensor],
           pasts: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           blocks: tuple | None = None) -> torch.Tensor:
    """One decode step of several sequences, each with a coded block (``pasts`` >= 64), in one call of the fused
    kernel (their blocks through a block table; q [B, Hq, d], k/v [B, H, d], one token each); the same as
    :func:`attend` per sequence. ``blocks``: :func:`batch_blocks` of the batch (computed here if None). Returns
    [B, Hq, d]."""
    b, hq, d = q.shape
    h = k.shape[1]
    keep = [p % TOKEN_BLOCK for p in pasts]
    table, codes = blocks or batch_blocks(pages, tables, [p // TOKEN_BLOCK for p in pasts])
    ex = pages.exact
    slots = torch.tensor([s.slot for s in seqs])
    ex.reserve(max(s.slot for s in seqs), k[:, :, None])
    at = torch.tensor(keep)
    ex.fill_k[slots, :, at], ex.fill_v[slots, :, at] = k, v
    te = max(keep) + 1
    mask = None  # (every row sees all its exact tokens: no mask, as the cache's own step passes none)
    if min(keep) + 1 < te:
        mask = torch.cat([torch.ones(b, SINK_TOKENS, dtype=torch.bool), torch.arange(te) <= at[:, None]], dim=1)
    out = _fused(codec, layer, pages, q.view(b, h, hq // h, d), table, codes, ex.sink_k[slots], ex.sink_v[slots],
                 ex.fill_k[slots, :, :te], ex.fill_v[slots, :, :te], mask, scaling)
    for i, seq in enumerate(seqs):
        if keep[i] == TOKEN_BLOCK - 1:  # the block is complete: coded into the pages
            j = seq.slot
            stored = codec.encode(codec.groups.index([layer]), [ex.fill_k[j : j + 1]], [ex.fill_v[j : j + 1]],
                                  start=pasts[i] - keep[i])
            pages.write(tables[i], pasts[i] // TOKEN_BLOCK, pages.fmt.pack(stored))
    return out.view(b, hq, d)


#: engine steps after which a sequence's exact tokens are dropped if no request has shown its first page (a finished
#: request's are dropped sooner: when its first page is seen inside another request's table)
STALE_STEPS = 4096


class Engine:
    """A serving engine's EchoKV-Q: every layer's :class:`Pages` and the sequences' slots, each sequence known by
    its first page (stable while it runs, prefix caching off). An engine step calls :meth:`forward` per layer, in
    layer order."""

    def __init__(self, codec: HeadQuantCodec, heads: int):
        self.codec, self.heads = codec, heads
        self.first = min(codec.widths)
        self.fused = codec.kernel_path("cpu") == "cpp"  # else every call rebuilds the coded blocks (explicit path)
        self.formats = {layer: PageFormat(w, heads) for layer, w in codec.widths.items()}
        self.sequences: dict[int, Sequence] = {}
        self.free: list[int] = []  # slots of ended sequences, reused first
        self.slots = 0  # slots handed out
        self.pages: dict[int, tuple] = {}  # layer -> (its cache tensor, Pages)
        self.step = 0
        self.blocks: tuple | None = None  # this step's batch_blocks (the same for every layer)

    def chunk(self, layer: int, block_size: int) -> int:
        """Bytes per token of ``layer``'s cache (:func:`page_bytes`)."""
        return page_bytes(self.codec.widths[layer], self.heads, block_size)

    def pages_of(self, layer: int, cache: torch.Tensor) -> Pages:
        memo = self.pages.get(layer)
        if memo is None or memo[0] is not cache:
            memo = self.pages[layer] = (cache, Pages(cache, self.formats[layer]))
        return memo[1]

    def new_step(self, seq_lens: list[int], block_table: torch.Tensor, tokens: int) -> None:
        """Forget the sequences that ended (their first page now inside another request's table, or unseen for
        :data:`STALE_STEPS` steps): their slots are reused."""
        self.step += 1
        firsts, used = set(), set()
        for i, t in enumerate(seq_lens):
            row = block_table[i, : -(-t // tokens)].tolist()
            firsts.add(row[0])
            used.update(row[1:])
        for key in list(self.sequences):
            if key in firsts:
                self.sequences[key].step = self.step
            elif key in used or self.step - self.sequences[key].step > STALE_STEPS:
                self.free.append(self.sequences.pop(key).slot)

    def start(self, first: int) -> None:
        """A new sequence whose first page is ``first`` (its earlier holder, if any, has ended)."""
        old = self.sequences.pop(first, None)
        if old:
            slot = old.slot
        elif self.free:
            slot = self.free.pop()
        else:
            slot, self.slots = self.slots, self.slots + 1
        self.sequences[first] = Sequence(slot)
        self.sequences[first].step = self.step

    def forward(self, layer: int, query, key, value, cache, qsl: list[int], seq_lens: list[int],
                block_table: torch.Tensor, num_reqs: int, output, scale: float):
        """One layer of an engine step: request i's tokens are rows ``qsl[i]:qsl[i + 1]`` of query [N, Hq, d] and
        key/value [N, H, d], its length with them ``seq_lens[i]``, its pages ``block_table[i]``. Decode steps of
        requests with a coded block go through the fused kernel in one call (:func:`decode`); prefill chunks and
        short requests one by one (:func:`attend`). Writes ``output`` [N, Hq, d]; returns it."""
        pages = self.pages_of(layer, cache)
        if layer == self.first:
            self.new_step(seq_lens[:num_reqs], block_table, pages.tokens)
        batch: list[int] = []
        for i in range(num_reqs):
            q0, q1 = qsl[i], qsl[i + 1]
            if q1 == q0:
                continue
            past = seq_lens[i] - (q1 - q0)
            first = int(block_table[i, 0])
            if past == 0 and layer == self.first:
                self.start(first)
            if q1 - q0 == 1 and past >= TOKEN_BLOCK and self.fused:
                batch.append(i)
                continue
            out = attend(self.codec, layer, pages, self.sequences[first], block_table[i], past, query[q0:q1],
                         key[q0:q1], value[q0:q1], scale)
            output[q0:q1] = out.to(output.dtype)
        if batch:
            rows = torch.tensor([qsl[i] for i in batch])
            seqs = [self.sequences[int(block_table[i, 0])] for i in batch]
            tables, pasts = [block_table[i] for i in batch], [seq_lens[i] - 1 for i in batch]
            if layer == self.first:
                self.blocks = batch_blocks(pages, tables, [p // TOKEN_BLOCK for p in pasts])
            out = decode(self.codec, layer, pages, seqs, tables, pasts, query[rows], key[rows], value[rows], scale,
                         self.blocks)
            output[rows] = out.to(output.dtype)
        return output
