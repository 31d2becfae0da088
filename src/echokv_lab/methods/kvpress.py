"""kvpress presses (NVIDIA kvpress 0.5.5, https://github.com/NVIDIA/kvpress), run by kvpress itself.

Presses (``kvpress:<name>``) and the kvpress class each maps to, at the same compression ratio:

* ``snapkv``: :class:`kvpress.SnapKVPress` (Li et al. 2024, arXiv 2404.14469): keeps the tokens the
  last ``window_size`` (64) context queries attend to most (pooled); needs a context longer than
  the window.
* ``streamingllm``: :class:`kvpress.StreamingLLMPress` (Xiao et al. 2023, arXiv 2309.17453): keeps 4
  sink tokens and the most recent ones.
* ``knorm``: :class:`kvpress.KnormPress` (Devoto et al. 2024, arXiv 2406.11430): keeps the tokens with
  the smallest key norm.
* ``expected_attention``: :class:`kvpress.ExpectedAttentionPress` (kvpress' own): keeps the tokens
  with the largest attention expected from future queries (query statistics + averaged RoPE).
* ``think``: :class:`kvpress.ThinKPress` (Xu et al. 2024, arXiv 2407.21018): prunes key *channels*,
  not tokens; ``key_channel_compression_ratio = 2 * ratio`` so that the nominal K+V ratio is the
  requested one (kvpress' own definition: its ``compression_ratio`` is half the channel ratio);
  ratios >= 0.5 would prune every key channel and are refused.

Protocol (what kvpress' ``KVPressTextGenerationPipeline`` does): the whole context is prefilled in
one forward of the base model (``model.model``) with the press active (``with press(model):``; the
press compresses each layer's cache right after its attention), then the question is fed with
position ids continuing from the uncompressed context length, and the answer is decoded greedily
without the press. Token-eviction presses physically remove tokens from the cache tensors.
Differences from the pipeline: the token ids come from the harness (no chat template applied
here), and decoding stops *before* an end-of-sequence id of ``eos_ids`` (the pipeline appends it
and strips it when detokenizing; it also never stops on a first-token EOS).

Memory (:meth:`generate`'s report): measured from the real cache tensors. ``kept_fraction`` is the
whole cache at the end (compressed context + the uncompressed question and answer tokens) over a
full cache of the same tokens, ``context_kept_fraction`` the cache right after the compressed
prefill over the full context's. ThinK zeroes the pruned key channels but keeps them in the tensors
(kvpress does not remove them), so its measured kept fraction is 1.0; ``nonzero_fraction`` gives
the share of non-zero numbers, and ``nominal_kept_fraction`` the ``1 - ratio`` kvpress claims.

Perplexity: kvpress compresses only a one-shot prefill starting at position 0 (its presses check
``cache_position``), so it has no streaming chunk-by-chunk protocol: :meth:`nll` raises
:class:`MethodUnavailable`.

Unavailable (raises :class:`MethodUnavailable`): kvpress not installed; models with sliding-window
layers (Gemma-2/3 text models: kvpress 0.5.5 leaves sliding layers alone only for
``Gemma3ForConditionalGeneration`` and would evict tokens of the sliding-window layers of a
``Gemma3ForCausalLM``; ExpectedAttention also crashes on Gemma-3's per-layer-type RoPE); contexts
too short for the press (SnapKV: at most ``window_size`` tokens; StreamingLLM, ExpectedAttention: at
most their 4 sink tokens).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field

import torch

from echokv.cache import accounting
from echokv.models import kv_geometry
from echokv.placement import input_device
from echokv_lab.methods.base import Method, MethodUnavailable, register

#: ``kvpress:<name>`` -> the kvpress class
PRESSES = {
    "snapkv": "SnapKVPress",
    "streamingllm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "think": "ThinKPress",
}


def _kvpress():
    try:
        import kvpress
    except ImportError as exc:
        raise MethodUnavailable(
            "kvpress presses need kvpress: install the peers environment (pip install 'echokv[peers]', "
            f"transformers 5.2.x): {exc}"
        ) from exc
    return kvpress


def nonzero_fraction(cache) -> float:
    nz = n = 0
    for lay in cache.layers:
        for t in (getattr(lay, "keys", None), getattr(lay, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                nz += int((t != 0).sum())
                n += t.numel()
    return nz / n if n else 1.0


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


@dataclass
class KVPressMethod(Method):
    """A kvpress press at the method's compression ratio (see the module docstring)."""

    name: str = "kvpress"
    press: str = "snapkv"
    press_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if self.press not in PRESSES:
            raise ValueError(f"unknown kvpress press {self.press!r}; choose one of {', '.join(PRESSES)}")

    @classmethod
    def create(cls, ratio, artifacts=None, **kwargs):
        if not kvpress_available():
            raise MethodUnavailable(
                f"{kwargs.get('name', 'kvpress')} needs kvpress: install the peers environment "
                "(pip install 'echokv[peers]', transformers 5.2.x)"
            )
        return cls(ratio, **kwargs)

    @property
    def achieved_kept_fraction(self) -> None:
        return None  # measured per sample (the rows' kept_fraction): kvpress compresses the context only

    def info(self) -> dict:
        return {**super().info(), "press": self.press, "nominal_kept_fraction": 1.0 - self.compression_ratio}

    # -- the press --------------------------------------------------------------------------------
    def make_press(self, model):
        """The kvpress press object for ``model``; MethodUnavailable when it cannot run on it."""
        kvpress = _kvpress()
        geo = kv_geometry(model)
        if geo.sliding_layers:
            raise MethodUnavailable(
                f"kvpress:{self.press} cannot run on {type(model).__name__} ({geo.model_type}, sliding-window "
                f"layers {geo.sliding_layers}): kvpress {getattr(kvpress, '__version__', '0.5.x')} skips "
                "sliding-window layers only for Gemma3ForConditionalGeneration and would evict tokens of the "
                "sliding-window layers of this model"
            )
        cls = getattr(kvpress, PRESSES[self.press])
        r = self.compression_ratio
        if self.press == "think":
            if 2 * r >= 1:
                raise MethodUnavailable(
                    f"kvpress:think prunes key channels only: ratio {r:g} would need {2 * r:g} of the key channels "
                    "(ratios below 0.5 only)"
                )
            return cls(key_channel_compression_ratio=2 * r, **self.press_kwargs)
        return cls(compression_ratio=r, **self.press_kwargs)

    def _check_context(self, press, n: int) -> None:
        need = {"snapkv": getattr(press, "window_size", 0), "streamingllm": getattr(press, "n_sink", 0),
                "expected_attention": getattr(press, "n_sink", 0)}.get(self.press, 0)
        if self.compression_ratio > 0 and n <= need:
            raise MethodUnavailable(
                f"kvpress:{self.press} needs a context longer than {need} tokens to compress, got {n}"
            )

    # -- the protocol -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, context_ids, question_ids, max_new_tokens, eos_ids=()):
        """Compressed one-shot prefill of the context, then greedy question + answer (kvpress' pipeline)."""
        from transformers import DynamicCache

        press = self.make_press(model)
        self._check_context(press, len(context_ids))
        if not question_ids:
            raise ValueError("the kvpress protocol decodes after the question: pass at least one question token")
        device = input_device(model)
        ctx = torch.tensor([context_ids], device=device)
        n_ctx = ctx.shape[1]
        cache = DynamicCache()
        with press(model) if self.compression_ratio > 0 else contextlib.nullcontext():
            model.model(input_ids=ctx, past_key_values=cache)
        ctx_bytes = accounting.nbytes(cache)
        ctx_full = accounting.full_nbytes(cache, tokens=n_ctx)
        ctx_nonzero = nonzero_fraction(cache)

        q = torch.tensor([question_ids], device=device)
        pos = torch.arange(n_ctx, n_ctx + q.shape[1], device=device)[None]
        logits = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
        fed = n_ctx + q.shape[1]
        nxt_pos = pos[:, -1:] + 1
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in eos_ids:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=cache,
                           position_ids=nxt_pos).logits
            nxt_pos = nxt_pos + 1
            fed += 1
        full = accounting.full_nbytes(cache, tokens=fed)
        now = accounting.nbytes(cache)
        report = {
            "mode": "compressed" if self.compression_ratio > 0 else "full",
            "switched_at": n_ctx,
            "tokens": fed,
            "cache_bytes": now,
            "full_cache_bytes": full,
            "kept_fraction": now / full if full else 1.0,
            "context_tokens": n_ctx,
            "context_cache_bytes": ctx_bytes,
            "context_full_cache_bytes": ctx_full,
            "context_kept_fraction": ctx_bytes / ctx_full if n_ctx else 1.0,
            "press": type(press).__name__,
        }
        if self.press == "think":
            report["nonzero_fraction"] = ctx_nonzero
            report["nominal_kept_fraction"] = 1.0 - self.compression_ratio
            report["note"] = "ThinK zeroes pruned key channels but keeps them in the cache tensors"
        return out, report

    def nll(self, model, ids, chunk_size=None):
        raise MethodUnavailable(
            f"kvpress:{self.press} has no perplexity protocol: kvpress compresses only a one-shot prefill that "
            "starts at position 0, not a stream of chunks attending to a compressed past"
        )


for _press in PRESSES:
    register(f"kvpress:{_press}", press=_press)(KVPressMethod)
