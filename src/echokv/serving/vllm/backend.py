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

from ..pages import Engine
from ..rows import KVSerde


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
        if isinstance(self.state, Engine):  # EchoKV-Q: serving/pages.py
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
        return self.state.forward(self.layer, query, key, value, kv_cache, m.query_start_loc_cpu.tolist(),
                                  m.seq_lens.tolist(), m.block_table, m.num_reqs, output, self.scale)
