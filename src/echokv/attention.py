"""The ``echokv`` attention and its scope: the one place where echokv changes how a model attends.

The ``echokv`` attention implementation, registered in transformers' attention and mask interfaces, calls the
stock SDPA function with the stock SDPA mask, except for decode steps (one query position), which it computes with
the query heads of each KV head packed as the rows of one matrix (:func:`packed_decode`: the same SDPA kernel and
mask; outputs equal to the stock call's up to rounding). It has two hooks:

* calibration capture (:func:`hooked`): a callback sees each layer's post-RoPE queries, keys and values;
* the compressed cache's fast decode path (:func:`hand_off`): a cache layer's ``update`` hands the attention
  call that immediately follows it in the same layer a function computing that layer's attention over the
  compressed past (:meth:`~echokv.cache.codec.KVCodec.fast_attention`), through a context variable.

Building a cache never changes the model. A model runs the echokv attention only inside
``with echokv_attention(model):`` (or :func:`echokv.generate`, which opens that scope for echokv's caches); the
model's configuration is restored on exit. A cache defers to the fast path only while its model is in that scope
(:func:`in_scope`); outside it, it rebuilds the compressed past explicitly, which gives the same outputs up to
rounding (the reference the fast path is tested against).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

NAME = "echokv"

# hook(module, query, key, value, attention_mask, scaling) -> attention output [B, T, H, d] or None
_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("echokv_attention_hook", default=None)
# (layer_idx, fn(query, key, value, attention_mask, scaling)): set by a cache layer's update() for the
# attention call that immediately follows it in the same layer
_HANDED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("echokv_handed", default=None)
# ids of the model configs that run the echokv attention in the current scope
_SCOPE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("echokv_scope", default=frozenset())
# whether decode steps run packed GQA (:func:`packed_decode`); off only to time or test the stock SDPA call
_PACK: contextvars.ContextVar[bool] = contextvars.ContextVar("echokv_pack", default=True)


_SDPA: Callable | None = None


def _sdpa() -> Callable:
    global _SDPA  # looked up once: this runs for every layer of every decode step
    if _SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _SDPA = sdpa_attention_forward
    return _SDPA


def packs(module, query, key, kwargs) -> bool:
    """Whether a call is a plain decode step that :func:`packed_decode` computes: one query position, grouped
    query heads, and nothing SDPA's arguments cannot say (no soft-capping, sinks or dropout)."""
    hq, h = query.shape[1], key.shape[1]
    return (query.shape[2] == 1 and hq % h == 0 and not kwargs.get("dropout") and kwargs.get("s_aux") is None
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and getattr(module, "training", False) is False
            and query.device.type == "cpu")


def packed_decode(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """A decode step's attention with the query heads of each KV head as rows of one matrix (the stock call passes
    ``enable_gqa``, with which SDPA's CPU kernel handles every query head alone). With bfloat16/float16 K/V and a
    mask that is none or one keep/drop row per sequence, the fused kernel of :mod:`echokv.kernels` reads the K/V in
    place (a 16-bit class, float32 accumulation); otherwise SDPA with the packed rows. Output [B, 1, Hq, d]."""
    b, hq, _, d = query.shape
    h = key.shape[1]
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1:  # [B, 1, 1, T]: one row for every head
        mask = mask[:, :, -1:]
    elif mask is not None and mask.dim() == 4 and mask.shape[1] == hq:  # a row per query head: rows as the queries
        mask = mask[:, :, -1:].reshape(b, h, hq // h, mask.shape[-1])
    rows = query.reshape(b, h, hq // h, d)
    # the fused kernel takes a keep/drop row per sequence: not per-head masks, nor additive biases
    if _fused(key) and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1)):
        from .kernels import cpu

        seen = None if mask is None else mask[:, 0, 0]
        return cpu.load().attend_full(rows, scaling, key, value, seen).reshape(b, 1, hq, d)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, hq, d)


_FUSED: bool | None = None


def _fused(key) -> bool:
    """Whether full-mode decode steps run the fused C++ kernel: 16-bit K/V on a CPU where it builds with AVX2 or
    AVX-512."""
    global _FUSED
    if key.device.type != "cpu" or key.dtype not in (torch.bfloat16, torch.float16) or key.stride(-1) != 1:
        return False
    if _FUSED is None:
        import os

        from .kernels import cpu

        try:  # never an error inside a decode step: without the C++ kernel, SDPA runs
            _FUSED = (os.environ.get("ECHOKV_KERNEL", "auto") not in ("torch", "triton") and cpu.available()[0]
                      and not cpu.plain())
        except (RuntimeError, OSError, ImportError):
            _FUSED = False
    return _FUSED


def echokv_attention_forward(module, query, key, value, attention_mask, **kwargs):
    handed = _HANDED.get()
    if handed is not None and handed[0] == module.layer_idx:
        _HANDED.set(None)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return handed[1](query, key, value, attention_mask, scaling), None
    hook = _HOOK.get()
    if hook is not None:
        out = hook(module, query, key, value, attention_mask, kwargs.get("scaling"))
        if out is not None:
            return out, None
    if _PACK.get() and packs(module, query, key, kwargs):
        return packed_decode(query, key, value, attention_mask, kwargs.get("scaling") or query.shape[-1] ** -0.5), None
    return _sdpa()(module, query, key, value, attention_mask, **kwargs)


def hand_off(layer_idx: int, fn: Callable) -> None:
    """Have the next echokv attention call of layer ``layer_idx`` computed by ``fn`` instead."""
    _HANDED.set((layer_idx, fn))


def serves(model) -> bool:
    """Whether the echokv attention computes what ``model``'s own does: not for soft-capped attention logits or
    attention sinks, which SDPA (what it calls) does not apply, nor for a model that does not support SDPA."""
    if getattr(model, "_supports_sdpa", True) is False:
        return False
    if any(getattr(cfg, "attn_logit_softcapping", None) is not None for cfg in _configs(model)):
        return False
    return not any(hasattr(m, "sinks") for m in model.modules() if hasattr(m, "layer_idx"))


def runs_sdpa(model) -> bool:
    """Whether ``model`` was loaded with SDPA (or runs the echokv attention already): then the echokv attention
    changes nothing but speed."""
    return all(cfg._attn_implementation in ("sdpa", NAME) for cfg in _configs(model))


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


def config_ids(model) -> frozenset:
    """What identifies ``model`` to :func:`in_scope` (plain ints: a deep-copied cache keeps them)."""
    return frozenset(id(cfg) for cfg in _configs(model))


def in_scope(ids: frozenset) -> bool:
    """Whether the model of ``ids`` (:func:`config_ids`) runs the echokv attention in the current scope."""
    return ids <= _SCOPE.get()


@contextlib.contextmanager
def implementation(model, name: str = NAME):
    """Run the block with ``model`` switched to the attention implementation ``name`` (restored afterwards).

    ``"echokv"`` accepts a model loaded with SDPA (or eager) attention: its outputs are SDPA's, decode steps up to
    rounding (:func:`packed_decode`).
    """
    saved = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
    ids = config_ids(model)
    if name == NAME:
        register()
        for cfg, impl in saved:
            if impl not in (None, "sdpa", "eager", NAME):
                raise ValueError(
                    f"echokv needs the model's attention to be 'sdpa' (or 'eager'), not {impl!r}: load it with "
                    "attn_implementation='sdpa'"
                )
    for cfg, _ in saved:
        cfg._attn_implementation = name
    token = _SCOPE.set(_SCOPE.get() | ids if name == NAME else _SCOPE.get() - ids)
    try:
        yield model
    finally:
        _SCOPE.reset(token)
        for cfg, impl in saved:
            cfg._attn_implementation = impl


def echokv_attention(model):
    """``with echokv_attention(model):`` runs ``model`` with the echokv attention, which lets a compressed cache
    use its fast decode path (see the module docstring); the model is restored on exit."""
    return implementation(model, NAME)


@contextlib.contextmanager
def hooked(hook: Callable):
    """Run the block with ``hook`` called on every attention of a model that uses the echokv attention."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)
