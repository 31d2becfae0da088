"""echokv's vLLM plugin (vLLM 0.16; tested on its CPU build). Only importable where vLLM is installed
(``bash scripts/setup.sh serve``); nothing outside this package imports it, and it imports vLLM lazily.

vLLM calls :func:`register` in every process through the ``vllm.general_plugins`` entry point of echokv's
pyproject. It only registers names: an engine is unchanged (full mode) unless it asks for the architecture
:data:`ARCH` with an artifact (compressed mode), per engine::

    vllm serve MODEL_FOLDER --hf-overrides '{"architectures": ["EchoKVLlamaForCausalLM"], "echokv_artifact": "DIR"}'

:func:`serve_args` writes that flag. docs/serving.md has the design.
"""

from __future__ import annotations

import json
import logging
import os

#: the architecture an engine names to keep echokv's compressed cache
ARCH = "EchoKVLlamaForCausalLM"

logger = logging.getLogger("vllm.echokv")


def serve_args(artifact) -> list[str]:
    """The ``vllm serve`` arguments that serve ``artifact`` (a folder) in compressed mode."""
    overrides = {"architectures": [ARCH], "echokv_artifact": os.path.abspath(os.fspath(artifact))}
    return ["--hf-overrides", json.dumps(overrides)]


def register() -> None:
    """vLLM's plugin hook (called several times per process: idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "echokv.serving.vllm.model:EchoKVLlamaForCausalLM")
    register_backend(AttentionBackendEnum.CUSTOM, "echokv.serving.vllm.backend.EchoKVBackend")
    from .config import EchoKVVerifyConfig

    MODELS_CONFIG_MAP[ARCH] = EchoKVVerifyConfig  # the start-up check, in the API-server process
