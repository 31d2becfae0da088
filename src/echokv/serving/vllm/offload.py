"""A KV connector for a *full* engine: a prompt's K/V leaves as EchoKV-Q codes and comes back as K/V when a later
request has the same prompt (vLLM's ``ExampleConnector`` protocol: prompt-hash folders, block-aligned prefixes,
prompts prefilled in one step), the bytes and layout in :mod:`echokv.serving.offload`::

    vllm serve MODEL --no-enable-prefix-caching --kv-transfer-config '{"kv_connector": "EchoKVOffloadConnector",
        "kv_connector_module_path": "echokv.serving.vllm.offload", "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": DIR, "echokv_codec": CODEC}}'

CODEC: a folder ``python -m echokv.serving.export OUT --echokv-q RATIO`` wrote.
"""

from __future__ import annotations

import os

import torch
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector,
    align_to_block_size,
)
from vllm.model_executor.models.utils import extract_layer_index

from ...codecs.headq import read_config
from .. import offload
from ..check import ServeError, load_for_engine
from . import logger
from .config import refuse


class EchoKVOffloadConnector(ExampleConnector):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        model_config = vllm_config.model_config
        path = self._kv_transfer_config.get_from_extra_config("echokv_codec", None)
        if not path or read_config(path) is None:
            refuse(f"EchoKVOffloadConnector needs kv_connector_extra_config.echokv_codec, an EchoKV-Q codec folder "
                   f"(got {path!r}): write one with python -m echokv.serving.export OUT --echokv-q 0.5")
        try:
            codec = load_for_engine(path, model_config.hf_config, model_config.model)
        except ServeError as exc:
            refuse(str(exc))
        self.codec, self.codec_id = codec, read_config(path)["sha256"]
        self.layers = len(codec.groups)
        self._held: dict[str, dict] = {}  # folder -> the tensors of the layers saved so far
        self._where: dict = {}  # (isa, cache shape, dtype) -> the cache layout (offload.probe)

    # vLLM's example stores a prompt's first align(len) tokens but looks up align(len - 1): a prompt of k blocks
    # and one token never hit; here both are align(len), which always leaves the last token to compute
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        if not self._found_match_for_request(request):
            return 0, False
        return align_to_block_size(len(request.prompt_token_ids), self._block_size) - num_computed_tokens, False

    def _found_match_for_prompt(self, prompt_token_ids, mm_hashes) -> bool:
        n = align_to_block_size(len(prompt_token_ids), self._block_size)
        folder = self._generate_foldername_debug(torch.tensor(prompt_token_ids)[:n], mm_hashes)
        if not os.path.exists(folder):
            return False
        why = offload.check(folder, self.codec_id)
        if why:
            logger.warning("echokv: stored K/V refused, recomputed: %s", why)
        return why is None

    def _layout(self, isa: str, kv: torch.Tensor):
        key = (isa, tuple(kv.shape[2:]), kv.dtype)
        if key not in self._where:
            _, heads, size, dim = kv.shape[1:]
            self._where[key] = offload.probe(lambda k, v, kc, vc, s: ops.cpu_attn_reshape_and_cache(k, v, kc, vc, s, isa),
                                             size, heads, dim, kv.dtype)
        return self._where[key]

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        layer = extract_layer_index(layer_name)
        for request in self._get_connector_metadata().requests:
            if not request.is_store or len(request.slot_mapping) == 0:
                continue
            folder = self._generate_foldername_debug(request.token_ids, request.mm_hashes)
            if os.path.exists(folder):
                continue
            where_k, where_v = self._layout(attn_metadata.isa, kv_layer)
            slots = request.slot_mapping.long()
            k, v = offload.read_slots(kv_layer[0], where_k, slots), offload.read_slots(kv_layer[1], where_v, slots)
            held = self._held.setdefault(folder, {})
            held.update(offload.encode(self.codec, layer, k, v))
            if len(held) == 3 * self.layers:
                offload.save(folder, self._held.pop(folder), self.codec_id, len(slots))

    def start_load_kv(self, forward_context, **kwargs) -> None:
        if (metadata := forward_context.attn_metadata) is None:
            return
        isa = next(iter(metadata.values())).isa if isinstance(metadata, dict) else metadata.isa
        for request in self._get_connector_metadata().requests:
            if request.is_store:
                continue
            folder = self._generate_foldername_debug(request.token_ids, request.mm_hashes)
            tensors = offload.load(folder, self.codec_id)  # checked again: refused, never used
            slots = request.slot_mapping.long()
            logger.info("echokv: %d tokens' K/V restored from %s", len(slots), folder)
            for name, module in forward_context.no_compile_layers.items():
                if (caches := getattr(module, "kv_cache", None)) is None:
                    continue
                kv = caches[forward_context.virtual_engine]
                where_k, where_v = self._layout(isa, kv)
                k, v = offload.decode(self.codec, extract_layer_index(name), tensors)
                offload.write_slots(kv[0], where_k, slots, k)
                offload.write_slots(kv[1], where_v, slots, v)
