"""Prompts in, tokens out: a chat prompt's ids, a cache prefilled in chunks, generation through a cache.

:func:`generate` runs ``model.generate`` with a cache; for a cache that asks for the fast decode path it
opens the echokv attention scope for the call (:mod:`echokv.attention`); the model is unchanged after.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .attention import echokv_attention, runs_sdpa, serves
from .cache import CompressedCache, FullCache
from .config import GenerateConfig
from .models import cache_kwarg

#: tokens per forward call when a long prompt is fed through a cache (a compressing cache compresses between)
PREFILL_CHUNK = 512


def encode_prompt(tokenizer, text: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids [1, T] of a user prompt, through the chat template when the tokenizer has one."""
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"encode_prompt needs the model's tokenizer (from echokv.load_model), got {tokenizer!r}")
    if not isinstance(text, str):
        raise TypeError(f"the prompt must be a str, got {type(text).__name__}")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        msgs = [{"role": "user", "content": text}]
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def prefill(model, cache, input_ids, attention_mask=None, chunk_size: int = PREFILL_CHUNK,
            exact_prompt: bool = False):
    """Feed ``input_ids`` through ``model`` in chunks with ``cache``; returns the last logits [B, V].

    Between chunks a compressing cache compresses, so peak memory stays near one chunk of full KV, and every
    chunk rebuilds the compressed past. With ``exact_prompt`` it compresses once, after the last chunk
    (:meth:`~echokv.cache.CompressedCache.deferred`): the chunks attend to each other's exact K/V, as fast as the
    full cache, at the full cache's peak memory for the prompt. The tokens are appended to what ``cache`` holds
    (an echokv cache records them, so that :func:`generate` can tell a continuation from a new prompt).

    A padded batch needs ``attention_mask`` (1 on tokens, 0 on padding), padded on the left (the cache's slots are
    shared by the rows, so each row's last token must be the last slot: :func:`generate` re-aligns any padding);
    it covers what the cache holds and ``input_ids`` ([B, held + T]; [B, T] for an empty cache). A batch whose rows
    start or end with different runs of the pad token and no mask is refused.
    """
    _check_call(model, input_ids, "prefill")
    if cache is None or not hasattr(cache, "get_seq_length"):
        raise TypeError(f"prefill needs a cache to fill (e.g. EchoKVCache(model, artifact)), got {cache!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(exact_prompt, bool):
        raise TypeError(f"exact_prompt must be True or False, got {exact_prompt!r}")
    getattr(cache, "check_model", lambda _: None)(model)  # an echokv cache refuses another model
    start = cache.get_seq_length()
    if attention_mask is None:
        _refuse_unmasked_padding(model, input_ids, None, "prefill")
    else:
        attention_mask = _check_mask(attention_mask, input_ids, start, "prefill")
        if not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
            raise ValueError("prefill takes left-padded batches (each row's padding before its tokens: "
                             "tokenizer.padding_side = 'left'); echokv.generate takes any padding")
        if bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the plain path
    known = _recorded(cache, input_ids.shape[0], start) if attention_mask is None else None
    hold = cache.deferred() if exact_prompt and hasattr(cache, "deferred") else contextlib.nullcontext()
    with hold:
        logits = _feed(model, cache, input_ids, attention_mask, chunk_size, start)
    if hasattr(cache, "token_ids"):
        ok = known is not None and cache.get_seq_length() == start + input_ids.shape[1]
        cache.token_ids = torch.cat([known.to(input_ids.device), input_ids], 1) if ok else None
    return logits


def _feed(model, cache, input_ids, attention_mask, chunk_size: int, start: int):
    logits = None
    for s in range(0, input_ids.shape[1], chunk_size):
        ids = input_ids[:, s : s + chunk_size]
        mask = None if attention_mask is None else attention_mask[:, : start + s + ids.shape[1]]
        pos = torch.arange(start + s, start + s + ids.shape[1], device=ids.device)
        kwargs = {"cache_position": pos}
        if mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        # only the last position's logits are used: skip the vocabulary projection of the others
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs,
                    **cache_kwarg(model, cache))
        logits = out.logits[:, -1]
    return logits


def _check_call(model, input_ids, what: str) -> None:
    """Clear errors at the API boundary for what would fail deep inside transformers."""
    if not (hasattr(model, "config") and callable(model)):
        raise TypeError(f"{what} needs the model (a transformers causal LM, e.g. from echokv.load_model), got "
                        f"{type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids [batch, tokens] (e.g. from encode_prompt), got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}"
                         + (" (add the batch dimension: ids[None])" if input_ids.dim() == 1 else ""))
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): {what} needs at least one token")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")


def _pad_id(model, pad_token_id: int | None) -> int | None:
    if pad_token_id is not None:
        return int(pad_token_id)
    for config in (getattr(model, "generation_config", None), model.config):
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return None


def _refuse_unmasked_padding(model, input_ids, pad_token_id, what: str) -> None:
    """A batch whose rows begin or end with different numbers of pad tokens is padded; without a mask its short
    rows would attend to (and, right-padded, continue after) their padding. An unpadded batch passes, and so does
    a pad id that is also the end of a turn (SmolLM2's) inside a prompt."""
    pad = _pad_id(model, pad_token_id)
    if pad is None or input_ids.shape[0] < 2:
        return
    is_pad = (input_ids == pad).long()
    lead = is_pad.cumprod(1).sum(1)
    trail = is_pad.flip(1).cumprod(1).sum(1)
    if bool((lead != lead[0]).any()) or bool((trail != trail[0]).any()):
        raise ValueError(f"input_ids is a padded batch (rows begin or end with different runs of the pad token "
                         f"{pad}) and {what} got no attention_mask: pass the tokenizer's attention_mask (1 on "
                         "tokens, 0 on padding)")


def _check_mask(attention_mask, input_ids, held: int, what: str) -> torch.Tensor:
    """The mask as a long tensor on the ids' device, covering the held and the new tokens; refuses a mask that
    does not fit ``input_ids`` or leaves a row without a token."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, tokens] of 0 and 1 (the tokenizer's), got "
                        f"{type(attention_mask).__name__}")
    b, t = input_ids.shape
    if attention_mask.dim() == 2 and attention_mask.shape == (b, t) and held:
        attention_mask = torch.cat([attention_mask.new_ones(b, held), attention_mask], dim=1)
    if attention_mask.dim() != 2 or attention_mask.shape != (b, held + t):
        want = f"[{b}, {held + t}] (the {held} tokens the cache holds and the {t} new ones)" if held else f"[{b}, {t}]"
        raise ValueError(f"{what}: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}; it must be {want}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must hold 0 and 1 (integers or bools), got dtype {attention_mask.dtype}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask leaves row {', '.join(map(str, empty))} of the batch without a token")
    return mask


def _left_aligned(input_ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens moved to the end (its padding first, in order kept), and the columns that are padding in
    every row dropped: the cache's slots are shared by the rows, so every row's next token must follow its last
    slot (right padding would put it after the padding) and the longest row must start at slot 0 (the cache
    tells a continuation from a new prompt by that row's positions)."""
    order = torch.argsort(mask, dim=1, stable=True)  # 0s (padding) first, each group in its order
    ids, mask = input_ids.gather(1, order), mask.gather(1, order)
    first = int(mask.sum(0).nonzero()[0])
    return ids[:, first:], mask[:, first:]


def _recorded(cache, batch: int, held: int) -> torch.Tensor | None:
    """The token ids an echokv cache holds, when it recorded all of them (empty for an empty cache)."""
    if held == 0:
        return torch.zeros(batch, 0, dtype=torch.long)
    ids = getattr(cache, "token_ids", None)
    return ids if ids is not None and ids.shape == (batch, held) else None


def generate(model, input_ids: torch.Tensor, cache=None, *, max_new_tokens: int = GenerateConfig.max_new_tokens,
             sample: bool = GenerateConfig.sample, temperature: float = GenerateConfig.temperature,
             top_p: float = GenerateConfig.top_p, seed: int = GenerateConfig.seed, streamer=None,
             pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """New token ids [B, N] after ``input_ids`` [B, T], decoded through ``cache`` (default: the full cache).

    The prompt but its last token is prefilled in chunks first (:func:`prefill`), so a compressing cache
    compresses between chunks; greedy unless ``sample``.

    A cache that already holds tokens is continued only when ``input_ids`` extends them (the earlier prompt and
    answer, then new text: an echokv cache records what :func:`prefill` and :func:`generate` fed it); anything
    else is refused with ``ValueError``, because the answer would read the earlier prompt: call
    ``cache.reset()`` or make a new cache for a new prompt.

    A padded batch needs ``attention_mask`` (the tokenizer's: 1 on tokens, 0 on padding; left, right or both):
    each row answers as it would alone (its tokens are moved after its padding first, because the rows share the
    cache's slots). Rows that begin or end with different runs of the pad token and no mask are refused.
    """
    _check_call(model, input_ids, "generate")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    cache = FullCache(model) if cache is None else cache
    getattr(cache, "check_model", lambda _: None)(model)  # an echokv cache refuses another model
    held = cache.get_seq_length()
    mask = None
    if attention_mask is None:
        _refuse_unmasked_padding(model, input_ids, pad_token_id, "generate")
    else:
        mask = _check_mask(attention_mask, input_ids, 0, "generate")
        if bool(mask.all()):
            mask = None  # nothing padded: the plain path
        elif held:
            raise ValueError(f"this cache already holds {held} tokens; a padded batch is not continued in a cache "
                             "(its rows are re-aligned): call cache.reset() and pass the whole text with its "
                             "attention_mask")
        else:
            input_ids, mask = _left_aligned(input_ids, mask)
    if held:
        known = _recorded(cache, input_ids.shape[0], held)
        if known is None or input_ids.shape[1] <= held or not torch.equal(input_ids[:, :held], known.to(input_ids.device)):
            raise ValueError(
                f"this cache already holds {held} tokens, and input_ids ({input_ids.shape[1]} tokens) does not "
                "extend them: it is a new prompt, whose answer would read the previous one. Call cache.reset() or "
                "pass a new cache; to continue, pass the earlier prompt and answer followed by the new text"
            )
    # echokv's caches run in the echokv attention: the compressed cache's fast path, and packed decode steps of a
    # model loaded with SDPA (another attention implementation is left as it is, unless the fast path asks)
    ours = isinstance(cache, CompressedCache) and serves(model) and (runs_sdpa(model) or getattr(cache, "fast", False))
    scope = echokv_attention(model) if ours else contextlib.nullcontext()
    torch.manual_seed(seed)
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "streamer": streamer,
              "pad_token_id": pad_token_id, **cache_kwarg(model, cache)}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with scope:
        if input_ids.shape[1] - held > 1:  # long prompts: chunked, so a compressing cache compresses between chunks
            prefill(model, cache, input_ids[:, held:-1], attention_mask=None if mask is None else mask[:, :-1])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids) if mask is None else mask, **kwargs)
    if hasattr(cache, "token_ids"):  # what the cache holds now: all but the last new token (a padded batch: unknown)
        n = cache.get_seq_length()
        cache.token_ids = out[:, :n] if n <= out.shape[1] and mask is None else None
    return out[:, input_ids.shape[1]:]


#: Logit differences between two exact computations of the same step, by the model's dtype: below this, which of two
#: tokens wins is rounding, not the cache. Measured on SmolLM2-135M (30 layers, logits ~10-30): one decode step from
#: the same cache state, the compressed cache's fast and explicit paths differ by up to 1.06 in bfloat16 (ten prompts,
#: 16 steps, ratios 0.5 and 0.75; the bfloat16 step at 25 is 0.125) and 5e-5 in float32; stock SDPA and packed-GQA
#: attention on the full cache, both exact, by up to 0.88 in bfloat16.
NEAR_TIE = {torch.bfloat16: 1.5, torch.float16: 0.2, torch.float32: 1e-3}


def near_tie(dtype: torch.dtype) -> float:
    """The logit margin under which two tokens are a near tie for a model running in ``dtype`` (:data:`NEAR_TIE`)."""
    return NEAR_TIE.get(dtype, NEAR_TIE[torch.float32])


@torch.no_grad()
def divergence(model, input_ids: torch.Tensor, reference: torch.Tensor, answer: torch.Tensor, make_cache,
               reference_cache=None) -> dict | None:
    """Where a greedy ``answer`` [N] left the ``reference`` answer [M] to the same prompt ``input_ids`` [1, T], and
    why: ``None`` when one is a prefix of the other (or they are equal), else the first differing token ``index``,
    both tokens, and the logit margins of each cache at that step (``reference_margin``: how much the reference
    cache preferred its token, ``answer_margin``: the answer's cache, its own), with ``near_tie``: the reference's
    margin is within the rounding of the model's dtype (:func:`near_tie`). ``make_cache()`` builds a cache like the
    one that produced ``answer``; ``reference_cache()`` one like the reference's (default: the full cache). Both are
    replayed as :func:`generate` runs them: the prompt but its last token prefilled, then one token per step."""
    n = min(len(reference), len(answer))
    differs = (reference[:n] != answer[:n]).nonzero()
    if not len(differs):
        return None
    i = int(differs[0])
    ref_tok, ans_tok = int(reference[i]), int(answer[i])
    steps = torch.cat([input_ids[0, -1:], reference[:i].to(input_ids.device)])

    def replay(cache) -> torch.Tensor:
        scope = echokv_attention(model) if serves(model) and hasattr(cache, "fast") else contextlib.nullcontext()
        with scope:
            if input_ids.shape[1] > 1:
                prefill(model, cache, input_ids[:, :-1])
            start = cache.get_seq_length()
            for j, tok in enumerate(steps.tolist()):
                pos = torch.tensor([start + j], device=input_ids.device)
                logits = model(input_ids=torch.tensor([[tok]], device=input_ids.device), use_cache=True,
                               cache_position=pos, logits_to_keep=1, **cache_kwarg(model, cache)).logits[0, -1]
        return logits.float()

    ref_logits = replay(reference_cache() if reference_cache is not None else FullCache(model))
    ans_logits = replay(make_cache())
    margin = float(ref_logits[ref_tok] - ref_logits[ans_tok])
    return {
        "index": i, "reference_token": ref_tok, "answer_token": ans_tok,
        "reference_margin": margin, "answer_margin": float(ans_logits[ans_tok] - ans_logits[ref_tok]),
        "near_tie": margin <= near_tie(next(model.parameters()).dtype),
    }


@torch.no_grad()
def nll(model, cache, ids: torch.Tensor, chunk_size: int) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` [1, T] and the tokens it sums, fed through ``cache`` chunk by chunk (the
    cache compresses between chunks, as it would while streaming)."""
    total, count = 0.0, 0
    for s in range(0, ids.shape[1] - 1, chunk_size):
        x, y = ids[:, s : s + chunk_size], ids[:, s + 1 : s + 1 + chunk_size]
        pos = torch.arange(s, s + x.shape[1], device=ids.device)
        logits = model(input_ids=x, use_cache=True, cache_position=pos, **cache_kwarg(model, cache)).logits
        logits = logits[:, : y.shape[1]]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
        count += y.numel()
        cache.compress()
    return total, count
