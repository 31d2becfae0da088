"""Baselines compared with EchoKV at equal KV memory, one small class per file.

Each is a :class:`~echokv.baselines.base.Method` whose one hook, ``make_codec``, says what compressed
tokens become; kvpress presses run through kvpress itself.
"""

from __future__ import annotations

import importlib.util

from .base import Method
from .headdrop import HeadDropMethod
from .lowrank import LowRankMethod
from .quant import QuantMethod
from .xlayer_svd import CrossLayerSVDMethod

BASELINES: dict[str, type[Method]] = {
    "headdrop": HeadDropMethod,
    "lowrank": LowRankMethod,
    "xlayer-svd": CrossLayerSVDMethod,
    "quant": QuantMethod,
}

# kvpress presses exposed as kvpress:<name>
KVPRESS_PRESSES = ("snapkv", "streamingllm", "knorm", "expected_attention", "think")


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None
