"""The ``echokv`` attention implementation: transformers' SDPA attention with one hook.

Registered under the name ``"echokv"`` in transformers' attention and mask interfaces, it calls the
stock SDPA function with the stock SDPA mask, so a model switched to it computes bit-identical
outputs. The hook lets echokv see each layer's post-RoPE queries, keys and values (calibration
capture) or replace the attention of a layer (the compressed cache's fast decode path).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

NAME = "echokv"

# hook(module, query, key, value, attention_mask, scaling) -> attention output [B, T, H, d] or None
_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("echokv_attention_hook", default=None)
# (layer_idx, fn(query, key, value, attention_mask, scaling)): set by a cache's update() for the
# attention call that immediately follows it in the same layer
_DEFERRED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("echokv_deferred", default=None)


_SDPA: Callable | None = None


def _sdpa() -> Callable:
    global _SDPA  # looked up once: this runs for every layer of every decode step
    if _SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _SDPA = sdpa_attention_forward
    return _SDPA


def echokv_attention_forward(module, query, key, value, attention_mask, **kwargs):
    deferred = _DEFERRED.get()
    if deferred is not None and deferred[0] == module.layer_idx:
        _DEFERRED.set(None)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return deferred[1](query, key, value, attention_mask, scaling), None
    hook = _HOOK.get()
    if hook is not None:
        out = hook(module, query, key, value, attention_mask, kwargs.get("scaling"))
        if out is not None:
            return out, None
    return _sdpa()(module, query, key, value, attention_mask, **kwargs)


def defer(layer_idx: int, fn: Callable) -> None:
    """Have the next echokv attention call of layer ``layer_idx`` computed by ``fn`` instead."""
    _DEFERRED.set((layer_idx, fn))


def is_enabled(model) -> bool:
    return all(cfg._attn_implementation == NAME for cfg in _configs(model))


def register() -> None:
    """Make ``attn_implementation="echokv"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, echokv_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _configs(model):
    cfg = model.config
    yield cfg
    for name in ("text_config", "decoder"):
        sub = getattr(cfg, name, None)
        if sub is not None and sub is not cfg:
            yield sub


def enable(model) -> None:
    """Switch a model from SDPA (or eager) to the echokv attention; outputs stay identical to SDPA."""
    register()
    for cfg in _configs(model):
        impl = cfg._attn_implementation
        if impl not in (None, "sdpa", "eager", NAME):
            raise ValueError(
                f"echokv needs the model's attention to be 'sdpa' (or 'eager'), not {impl!r}: load it with "
                "attn_implementation='sdpa'"
            )
        cfg._attn_implementation = NAME


@contextlib.contextmanager
def hooked(hook: Callable):
    """Run the block with ``hook`` called on every attention of a model that uses the echokv attention."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


@contextlib.contextmanager
def implementation(model, name: str = NAME):
    """Temporarily switch ``model`` to the attention implementation ``name`` (restored afterwards)."""
    saved = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
    if name == NAME:
        enable(model)
    else:
        for cfg in _configs(model):
            cfg._attn_implementation = name
    try:
        yield model
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation = impl


def echokv_attention(model):
    """Temporarily switch ``model`` to the echokv attention (restored afterwards)."""
    return implementation(model, NAME)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, T, d] -> [B, H_kv * n_rep, T, d] (GQA: each KV head serves n_rep query heads)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)
