"""Prompts in, tokens out: a chat prompt's ids, a cache prefilled in chunks, generation through a cache.

:func:`generate` runs ``model.generate`` with a cache; for a cache that asks for the fast decode path it
opens the echokv attention scope for the call (:mod:`echokv.attention`); the model is unchanged after.
"""

from __future__ import annotations

import contextlib

import torch

from .config import GenerateConfig
from .models import cache_kwarg

#: tokens per forward call when a long prompt is fed through a cache (a compressing cache compresses between)
PREFILL_CHUNK = 512


def encode_prompt(tokenizer, text: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids [1, T] of a user prompt, through the chat template when the tokenizer has one."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        msgs = [{"role": "user", "content": text}]
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def prefill(model, cache, input_ids, attention_mask=None, chunk_size: int = PREFILL_CHUNK):
    """Feed ``input_ids`` through ``model`` in chunks with ``cache``; returns the last logits [B, V].

    Between chunks a compressing cache compresses, so peak memory stays near one chunk of full KV.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    logits = None
    start = cache.get_seq_length()
    for s in range(0, input_ids.shape[1], chunk_size):
        ids = input_ids[:, s : s + chunk_size]
        mask = None if attention_mask is None else attention_mask[:, : s + ids.shape[1]]
        pos = torch.arange(start + s, start + s + ids.shape[1], device=ids.device)
        kwargs = {"cache_position": pos}
        if mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        # only the last position's logits are used: skip the vocabulary projection of the others
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs,
                    **cache_kwarg(model, cache))
        logits = out.logits[:, -1]
    return logits


def generate(model, input_ids: torch.Tensor, cache=None, *, max_new_tokens: int = GenerateConfig.max_new_tokens,
             sample: bool = GenerateConfig.sample, temperature: float = GenerateConfig.temperature,
             top_p: float = GenerateConfig.top_p, seed: int = GenerateConfig.seed, streamer=None,
             pad_token_id: int | None = None) -> torch.Tensor:
    """New token ids [B, N] after ``input_ids`` [B, T], decoded through ``cache`` (default: the full cache).

    The prompt but its last token is prefilled in chunks first (:func:`prefill`), so a compressing cache
    compresses between chunks; greedy unless ``sample``.
    """
    from .attention import echokv_attention
    from .cache import FullCache

    cache = FullCache(model) if cache is None else cache
    scope = echokv_attention(model) if getattr(cache, "fast", False) else contextlib.nullcontext()
    torch.manual_seed(seed)
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "streamer": streamer,
              "pad_token_id": pad_token_id, **cache_kwarg(model, cache)}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with scope:
        if input_ids.shape[1] > 1:  # long prompts: chunked, so a compressing cache compresses between chunks
            prefill(model, cache, input_ids[:, :-1])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out[:, input_ids.shape[1]:]
