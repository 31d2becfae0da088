"""EchoKVLlamaForCausalLM: vLLM's Llama whose attention layers keep the artifact's stored rows (backend.py).

Weights, projections, RoPE and the attention geometry are vLLM's own; only each layer's KV cache spec and its
attention backend change.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ...codecs.headq import HeadQuantCodec
from ..pages import Engine
from ..rope import RopeHost
from ..rows import KVSerde
from .backend import EchoKVBackend, GroupState
from .config import check

#: the groups of the model being built (set by EchoKVLlamaForCausalLM around its layers' construction)
_BUILDING: dict = {}


class EchoKVAttention(Attention):
    """vLLM's Attention whose cache spec is the layer's chunk of its group's rows."""

    def __init__(self, *args, echokv_state: GroupState | Engine, echokv_layer: int, **kwargs):
        super().__init__(*args, attn_backend=EchoKVBackend, echokv_state=echokv_state, echokv_layer=echokv_layer,
                         **kwargs)
        self.echokv_state, self.echokv_layer = echokv_state, echokv_layer

    def get_kv_cache_spec(self, vllm_config):
        state, block = self.echokv_state, vllm_config.cache_config.block_size
        half = (state.chunk(self.echokv_layer, block) if isinstance(state, Engine) else state.chunk) // 2
        return FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=1, head_size=half,
                                 head_size_v=half, dtype=torch.uint8)


class EchoKVLlamaAttention(LlamaAttention):
    def __init__(self, config, *args, prefix: str = "", cache_config=None, quant_config=None, **kwargs):
        super().__init__(config, *args, prefix=prefix, cache_config=cache_config, quant_config=quant_config, **kwargs)
        layer = extract_layer_index(prefix)
        if "headq" in _BUILDING:  # EchoKV-Q: every layer its own pages
            state, index = _BUILDING["headq"], 0
        else:
            serde: KVSerde = _BUILDING["serde"]
            group = serde.layout.group_of(layer)
            state = _BUILDING["groups"][group]
            index = serde.codec.groups[group].index(layer)
        # replace the Attention LlamaAttention built: its name must be free first
        del get_current_vllm_config().compilation_config.static_forward_context[self.attn.layer_name]
        self.attn = EchoKVAttention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                                    cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                                    echokv_state=state, echokv_layer=layer, echokv_index=index)
        if not isinstance(state, Engine):
            state.layers[index] = self.attn


class EchoKVDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, attn_layer_type=EchoKVLlamaAttention):
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=attn_layer_type)


class EchoKVLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", layer_type=EchoKVDecoderLayer):
        loaded = check(vllm_config)
        hf = vllm_config.model_config.hf_config
        if isinstance(loaded, HeadQuantCodec):
            _BUILDING.update(headq=Engine(loaded, hf.num_key_value_heads))
        else:
            serde = KVSerde(loaded, RopeHost(hf, vllm_config.model_config.dtype))
            _BUILDING.update(serde=serde, groups=[GroupState(serde, g) for g in range(len(serde.codec.groups))])
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        finally:
            _BUILDING.clear()
