"""An attention backend whose cache holds a mix artifact's stored rows instead of K/V.

Layout. A group of S layers shares one row of bytes per token (:class:`~echokv.serving.rows.RowFormat`: codes,
scales, zero-points, float16 components, the position). vLLM gives every layer its own cache tensor and one block
table for all of them, so the row is cut into S equal chunks and layer j's tensor
``[num_blocks, block_size, chunk]`` (uint8) holds chunk j of every token's row. Each layer declares its chunk
through a FullAttentionSpec (num_kv_heads=1, head_size=chunk/2, uint8): vLLM only counts the bytes.

A step. The group's rows need the K/V of all S layers, so layers 1..S-1 leave this step's K/V in the group's
state and the last one encodes the rows and writes them. Attention reads every past token from the rows
(rebuilt by the codec: :meth:`~echokv.serving.rows.KVSerde.decode_layer`) and this step's tokens as they are:
echokv's own semantics (exact within one forward call, compressed afterwards). Pure torch and float: correct,
not fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from ...codecs.headq import TOKEN_BLOCK
from ..pages import PageFormat, Pages, Sequence, attend, batch_blocks, decode, page_bytes
from ..rows import KVSerde

#: engine steps after which a sequence's exact tokens are dropped if no request has shown its first page (a finished
#: request's are dropped sooner: when its first page is seen inside another request's table)
STALE_STEPS = 4096


class GroupState:
    """One group of layers in one engine process: its layers (their cache tensors) and this step's K/V of the
    layers that came before the last one."""

    def __init__(self, serde: KVSerde, group: int):
        self.serde, self.group = serde, group
        self.size = len(serde.codec.groups[group])
        self.nbytes = serde.formats[group].nbytes
        per = -(-self.nbytes // self.size)
        self.chunk = per + per % 2  # a FullAttentionSpec counts K and V halves: an even number of bytes
        self.layers: list = [None] * self.size  # the Attention modules, in group order
        self.pending: list = [None] * self.size

    def caches(self) -> list[torch.Tensor]:
        return [attn.kv_cache[0].view(-1, self.chunk) for attn in self.layers]

    def write(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Encode this step's K/V of the whole group and store the rows at ``slots``."""
        keys = [k.transpose(0, 1)[None] for k, _ in self.pending]
        values = [v.transpose(0, 1)[None] for _, v in self.pending]
        self.pending = [None] * self.size
        rows = self.serde.encode_rows(self.group, keys, values, positions[None])[0]
        rows = torch.nn.functional.pad(rows, (0, self.chunk * self.size - self.nbytes))
        ok = slots >= 0
        for j, cache in enumerate(self.caches()):
            cache[slots[ok]] = rows[ok, j * self.chunk : (j + 1) * self.chunk]

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """The rows [1, T, nbytes] stored at ``slots``."""
        return torch.cat([cache[slots] for cache in self.caches()], dim=-1)[None, :, : self.nbytes]


class HeadQState:
    """An engine's EchoKV-Q codec (every layer's pages: :mod:`echokv.serving.pages`) and its sequences' exact
    tokens (the sinks' copies and the block being filled), keyed by each sequence's first page."""

    def __init__(self, codec, heads: int):
        self.codec, self.heads = codec, heads
        self.first = min(codec.widths)
        self.fused = codec.kernel_path("cpu") == "cpp"  # else every call rebuilds the coded blocks (explicit path)
        self.formats = {layer: PageFormat(w, heads) for layer, w in codec.widths.items()}
        self.sequences: dict[int, Sequence] = {}
        self.free: list[int] = []  # slots of ended sequences (Exact's rows), reused first
        self.slots = 0  # slots handed out
        self.pages: dict[int, tuple] = {}  # layer -> (its cache tensor, Pages)
        self.step = 0
        self.blocks: tuple | None = None  # this step's batch_blocks (the same for every layer)

    def chunk(self, layer: int, block_size: int) -> int:
        return page_bytes(self.codec.widths[layer], self.heads, block_size)

    def pages_of(self, layer: int, cache: torch.Tensor) -> Pages:
        memo = self.pages.get(layer)
        if memo is None or memo[0] is not cache:
            memo = self.pages[layer] = (cache, Pages(cache, self.formats[layer]))
        return memo[1]

    def new_step(self, m) -> None:
        """Forget the exact tokens of sequences that ended (their first page now serves another request)."""
        self.step += 1
        firsts, used = set(), set()
        bs = next(iter(self.pages.values()))[1].tokens if self.pages else 1
        for i, t in enumerate(m.seq_lens.tolist()[: m.num_reqs]):
            row = m.block_table[i, : -(-t // bs)].tolist()
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


class EchoKVBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return EchoKVImpl

    @staticmethod
    def get_builder_cls():
        return EchoKVMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, block_size, 2 * num_kv_heads * head_size)  # the layer's chunk of every token's row

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return True

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class EchoKVMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class EchoKVMetadataBuilder(AttentionMetadataBuilder[EchoKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        m = common_attn_metadata
        return EchoKVMetadata(m.num_actual_tokens, m.num_reqs, m.query_start_loc_cpu, m.seq_lens.cpu(),
                              m.block_table_tensor, m.slot_mapping)


class EchoKVImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, echokv_state: GroupState | None = None, echokv_layer: int = 0,
                 echokv_index: int = 0):
        if attn_type != AttentionType.DECODER or alibi_slopes is not None or sliding_window is not None:
            raise NotImplementedError("echokv: decoder full attention only")
        if kv_sharing_target_layer_name is not None or logits_soft_cap:
            raise NotImplementedError("echokv: no KV sharing, no logit soft-capping")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.state, self.layer, self.index = echokv_state, echokv_layer, echokv_index

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # the profiling run
            return output
        m: EchoKVMetadata = attn_metadata
        if isinstance(self.state, HeadQState):
            return self._forward_headq(query, key, value, kv_cache, m, output)
        st, n = self.state, m.num_actual_tokens
        qsl, seq = m.query_start_loc_cpu.tolist(), m.seq_lens.tolist()
        st.pending[self.index] = (key[:n], value[:n])
        if self.index == st.size - 1:
            positions = torch.cat([torch.arange(seq[i] - (qsl[i + 1] - qsl[i]), seq[i]) for i in range(m.num_reqs)])
            st.write(m.slot_mapping[:n].long(), positions)
        bs = kv_cache.shape[1]
        for i in range(m.num_reqs):
            q0, q1, t = qsl[i], qsl[i + 1], seq[i]
            ql = q1 - q0
            if ql == 0:
                continue
            past = t - ql
            q = query[q0:q1].transpose(0, 1)[None]  # [1, Hq, ql, d]
            k, v = key[q0:q1].transpose(0, 1)[None], value[q0:q1].transpose(0, 1)[None]
            mask = None
            if past:
                pos = torch.arange(past)
                rows = st.read(m.block_table[i, pos // bs].long() * bs + pos % bs)
                pk, pv = st.serde.decode_layer(self.layer, rows)
                k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
                mask = torch.arange(t)[None, :] <= (past + torch.arange(ql))[:, None]
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=self.num_heads > self.num_kv_heads)
            output[q0:q1] = o[0].transpose(0, 1).to(output.dtype)
        return output

    def _forward_headq(self, query, key, value, kv_cache, m: EchoKVMetadata, output):
        """EchoKV-Q: the decode steps of requests with a coded block in one call of the fused kernel (their pages
        through a block table: :func:`~echokv.serving.pages.decode`); prefill chunks and short requests one by one
        (:func:`~echokv.serving.pages.attend`)."""
        st = self.state
        pages = st.pages_of(self.layer, kv_cache)
        if self.layer == st.first:
            st.new_step(m)
        qsl, seq = m.query_start_loc_cpu.tolist(), m.seq_lens.tolist()
        batch: list[int] = []
        for i in range(m.num_reqs):
            q0, q1 = qsl[i], qsl[i + 1]
            if q1 == q0:
                continue
            past = seq[i] - (q1 - q0)
            first = int(m.block_table[i, 0])
            if past == 0 and self.layer == st.first:
                st.start(first)
            if q1 - q0 == 1 and past >= TOKEN_BLOCK and st.fused:
                batch.append(i)
                continue
            out = attend(st.codec, self.layer, pages, st.sequences[first], m.block_table[i], past, query[q0:q1],
                         key[q0:q1], value[q0:q1], self.scale)
            output[q0:q1] = out.to(output.dtype)
        if batch:
            rows = torch.tensor([qsl[i] for i in batch])
            seqs = [st.sequences[int(m.block_table[i, 0])] for i in batch]
            tables, pasts = [m.block_table[i] for i in batch], [seq[i] - 1 for i in batch]
            if self.layer == st.first:
                st.blocks = batch_blocks(pages, tables, [p // TOKEN_BLOCK for p in pasts])
            out = decode(st.codec, self.layer, pages, seqs, tables, pasts, query[rows], key[rows], value[rows],
                         self.scale, st.blocks)
            output[rows] = out.to(output.dtype)
        return output
