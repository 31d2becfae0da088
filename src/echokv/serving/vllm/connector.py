"""A KV connector that offloads a *full* engine's prompt K/V compressed by an echokv artifact, and rebuilds it when a
later request has the same prompt.

vLLM's ``ExampleConnector`` (a prompt's block-aligned K/V saved to a folder named by the hash of its tokens,
injected back into the paged cache on a hit) with the bytes replaced: instead of each layer's full K/V it stores
each group's rows (:class:`~echokv.serving.rows.KVSerde`, the artifact's kept fraction of the K/V), one raw file
per group, and on a hit writes the rebuilt K/V into the paged cache. Usage::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "EchoKVStorageConnector",
        "kv_connector_module_path": "echokv.serving.vllm.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": DIR, "echokv_artifact": ARTIFACT}}'

Like the example it follows, it saves a prompt prefilled in one step (no chunked prefill across steps) and
expects vLLM's CPU cache layout ``[2, num_blocks, num_kv_heads, block_size, head_size]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector
from vllm.model_executor.models.utils import extract_layer_index

from ..check import ServeError, load_for_engine
from ..rope import RopeHost
from ..rows import KVSerde
from .config import refuse


class EchoKVStorageConnector(ExampleConnector):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        model_config = vllm_config.model_config
        artifact = self._kv_transfer_config.get_from_extra_config("echokv_artifact", None)
        if not artifact:
            refuse("EchoKVStorageConnector needs kv_connector_extra_config.echokv_artifact")
        try:
            mixes = load_for_engine(artifact, model_config.hf_config, model_config.model)
        except ServeError as exc:
            refuse(str(exc))
        self.serde = KVSerde(mixes, RopeHost(model_config.hf_config, model_config.dtype))
        self._pending: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # folder -> layer -> K, V

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        """Hold the layer's K/V of each prompt to store; when a group is complete, write its rows."""
        layer = extract_layer_index(layer_name)
        group = self.serde.layout.group_of(layer)
        layers = self.serde.codec.groups[group]
        for request in self._get_connector_metadata().requests:
            if not request.is_store or len(request.slot_mapping) == 0:
                continue
            folder = self._generate_foldername_debug(request.token_ids, request.mm_hashes)
            if os.path.exists(folder):
                continue
            slots = request.slot_mapping.long()
            blocks, offsets = slots // kv_layer.shape[3], slots % kv_layer.shape[3]
            held = self._pending.setdefault(folder, {})
            held[layer] = (kv_layer[0][blocks, :, offsets].clone(), kv_layer[1][blocks, :, offsets].clone())  # [T, H, d]
            if any(x not in held for x in layers):
                continue
            keys = [held[x][0].transpose(0, 1)[None] for x in layers]
            values = [held.pop(x)[1].transpose(0, 1)[None] for x in layers]
            rows = self.serde.encode_rows(group, keys, values, torch.arange(len(slots))[None])[0]
            partial = Path(folder + ".partial")
            partial.mkdir(parents=True, exist_ok=True)
            (partial / f"group{group}.rows").write_bytes(rows.numpy().tobytes())
            if all((partial / f"group{g}.rows").is_file() for g in range(len(self.serde.formats))):
                os.rename(partial, folder)  # the folder is what a later request looks for: complete or absent
                del self._pending[folder]

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Write the rebuilt K/V of each prompt found in the store into the paged cache."""
        if forward_context.attn_metadata is None:
            return
        for request in self._get_connector_metadata().requests:
            if request.is_store:
                continue
            folder = Path(self._generate_foldername_debug(request.token_ids, request.mm_hashes))
            slots = request.slot_mapping.long()
            rows = []
            for g, fmt in enumerate(self.serde.formats):
                data = bytearray((folder / f"group{g}.rows").read_bytes())
                rows.append(torch.frombuffer(data, dtype=torch.uint8).view(1, len(slots), fmt.nbytes))
            for name, module in forward_context.no_compile_layers.items():
                caches = getattr(module, "kv_cache", None)
                if caches is None:
                    continue
                kv = caches[forward_context.virtual_engine]
                layer = extract_layer_index(name)
                k, v = self.serde.decode_layer(layer, rows[self.serde.layout.group_of(layer)])
                blocks, offsets = slots // kv.shape[3], slots % kv.shape[3]
                kv[0][blocks, :, offsets] = k[0].transpose(0, 1).to(kv.dtype)
                kv[1][blocks, :, offsets] = v[0].transpose(0, 1).to(kv.dtype)
