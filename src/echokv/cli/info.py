"""``echokv info``: the KV geometry of a model."""

from __future__ import annotations

import json

from ..config import InfoConfig
from ._args import from_args

CONFIGS = (InfoConfig,)
HELP = "KV geometry of a model"


def run(args) -> int:
    from ..models import kv_geometry, load_configured

    cfg = from_args(args, InfoConfig)
    model, _ = load_configured(cfg)  # also the tiny random models of echokv.tiny: tiny-llama, tiny-gemma3, ...
    geo = kv_geometry(model)
    if cfg.json:
        print(json.dumps({"model": cfg.model, **geo.to_dict()}))
        return 0
    sliding = ", ".join(map(str, geo.sliding_layers)) or "none"
    print(f"model              {cfg.model} ({geo.model_type})")
    print(f"layers             {geo.num_layers}")
    print(f"query heads        {geo.num_attention_heads}")
    print(f"KV heads           {geo.num_kv_heads}")
    print(f"head_dim           {geo.head_dim}")
    print(f"sliding layers     {sliding}" + (f" (window {geo.sliding_window})" if geo.sliding_layers else ""))
    print(f"max context        {geo.max_context}")
    print(f"KV bytes / token   {geo.kv_bytes_per_token} ({geo.dtype})")
    return 0
