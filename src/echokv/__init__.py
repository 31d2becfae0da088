"""echokv: KV cache compression for Hugging Face causal LMs by similarity-based reconstruction (EchoKV).

The library, without the command line (the ``cli`` package) or the evaluation harness (``eval``)::

    from echokv import EchoKVCache, encode_prompt, generate, load_model

Names are imported on first use, so ``import echokv`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_MODEL": "models",
    "KVGeometry": "models",
    "kv_geometry": "models",
    "load_model": "models",
    "TrainConfig": "config",
    "train": "training",
    "EchoKVCache": "codecs.mix",
    "CompressedCache": "cache",
    "FullCache": "cache",
    "echokv_attention": "attention",
    "encode_prompt": "generation",
    "generate": "generation",
    "prefill": "generation",
}
_ALIASES = {"load_artifact": ("artifact", "load"), "save_artifact": ("artifact", "save")}

__all__ = ["__version__"] + list(_EXPORTS) + list(_ALIASES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _ALIASES:
        module, attr = _ALIASES[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
