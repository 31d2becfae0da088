"""The start-up check, run by vLLM in the API-server process before any engine starts
(``VllmConfig.try_verify_and_update_config``). A refusal is one line and exit status 1: raised as SystemExit,
which vLLM's config validation (pydantic) does not wrap in a traceback."""

from __future__ import annotations

import logging

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..check import ServeError, load_for_engine

logger = logging.getLogger("vllm.echokv")


def refuse(message: str):
    logger.error("echokv: %s", message)
    raise SystemExit(f"echokv: {message}")


def check(vllm_config):
    """The served artifact's Mixes (checked against the served model and the engine's settings)."""
    model_config = vllm_config.model_config
    hf = model_config.hf_config
    artifact = getattr(hf, "echokv_artifact", None)
    if not artifact:
        refuse('the EchoKVLlamaForCausalLM architecture needs an artifact: --hf-overrides '
               '\'{"architectures": ["EchoKVLlamaForCausalLM"], "echokv_artifact": "DIR"}\'')
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype != "auto":
        refuse(f"--kv-cache-dtype {cache_dtype}: the compressed cache stores the artifact's own codes, it cannot "
               "be quantized again; drop --kv-cache-dtype")
    try:
        return load_for_engine(artifact, hf, model_config.model)
    except ServeError as exc:
        refuse(str(exc))


class EchoKVVerifyConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from ...codecs.headq import TOKEN_BLOCK, HeadQuantCodec

        loaded = check(vllm_config)
        artifact = vllm_config.model_config.hf_config.echokv_artifact
        if isinstance(loaded, HeadQuantCodec):  # EchoKV-Q: pages of whole 64-token blocks
            block = vllm_config.cache_config.block_size
            if block is None or block % TOKEN_BLOCK:
                refuse(f"EchoKV-Q codes blocks of {TOKEN_BLOCK} tokens: pass --block-size {TOKEN_BLOCK} or a "
                       f"multiple of it (got {block})")
            logger.warning("echokv: serving the EchoKV-Q codec %s (fused kernel path: %s)", artifact,
                           loaded.kernel_path("cpu"))
            return
        layout = loaded.layout
        logger.warning("echokv: serving %s: %d groups, kept fraction %.4f of a %d-bit cache", artifact,
                       len(layout.groups), layout.kept_fraction(), layout.element_bits)
