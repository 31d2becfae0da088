"""The plug-in interface shared by every method the evaluation harness runs.

A :class:`Method` has a name, a compression ratio, and one hook, :meth:`Method.make_codec`, that
returns the :class:`~echokv.cache.KVCodec` deciding what compressed tokens become (``None``: keep
the full cache). Everything else, prefill, compression, decoding, memory accounting, is the shared
:class:`~echokv.cache.CompressedCache`, so methods are compared through the same KV plumbing.

Protocol of one evaluation sample (as kvpress does it): the context is prefilled with exact attention
within each chunk, the cache is compressed, then the question and the answer are decoded through the
compressed cache. Perplexity streams text in chunks, every chunk attending to the compressed past.
Methods that do not fit this mould (kvpress presses) override :meth:`generate` / :meth:`nll`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import attention
from ..cache import CompressedCache, KVCodec, prefill
from ..models import cache_kwarg
from ..selection import check_ratio


class MethodUnavailable(RuntimeError):
    """The method cannot run here (missing package, unsupported model); the message says why."""


@dataclass
class Calibration:
    """What methods may learn from: token blocks of the calibration split ([N, T] ids)."""

    blocks: torch.Tensor
    cache: dict = field(default_factory=dict)  # shared statistics, computed once per run


@dataclass
class Method:
    """Base class: full cache. Subclasses override :meth:`make_codec` (and maybe :meth:`prepare`)."""

    compression_ratio: float = 0.0
    name: str = "full"
    chunk_size: int = 512

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    @property
    def label(self) -> str:
        return self.name if self.compression_ratio == 0 else f"{self.name}@{self.compression_ratio:g}"

    # -- the one hook -----------------------------------------------------------------------------
    def prepare(self, model, tokenizer, calibration: Calibration | None) -> None:
        """Fit whatever the method needs (bases, artifacts). Called once before the samples."""

    def make_codec(self, model) -> KVCodec | None:
        """The codec for compressed tokens; ``None`` keeps the full cache."""
        return None

    # -- running ------------------------------------------------------------------------------------
    def new_cache(self, model):
        codec = self.make_codec(model)
        if codec is None:
            return _FullCache(model)
        return CompressedCache(model, codec, mode="full", fast=True)

    def generate(self, model, context_ids, question_ids, max_new_tokens: int, eos_ids=()):
        """Greedy answer to one sample. Returns (new token ids, cache memory report)."""
        # the echokv attention (SDPA + the fast decode path of codecs that have one), only for this call
        with attention.implementation(model, attention.NAME):
            return self._generate(model, context_ids, question_ids, max_new_tokens, eos_ids)

    def nll(self, model, ids: torch.Tensor, chunk_size: int | None = None) -> tuple[float, int, dict]:
        """Summed next-token NLL of ``ids`` [1, T] decoded chunk by chunk through the compressed cache."""
        with attention.implementation(model, attention.NAME):
            return self._nll(model, ids, chunk_size)

    @torch.no_grad()
    def _generate(self, model, context_ids, question_ids, max_new_tokens, eos_ids):
        device = next(model.parameters()).device
        cache = self.new_cache(model)
        ctx = torch.tensor([context_ids], device=device)
        prefill(model, cache, ctx, chunk_size=self.chunk_size)
        cache.compress()
        ids = torch.tensor([question_ids], device=device)
        logits = prefill(model, cache, ids, chunk_size=self.chunk_size)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0].argmax())
            if nxt in eos_ids:
                break
            out.append(nxt)
            logits = prefill(model, cache, torch.tensor([[nxt]], device=device), chunk_size=1)
        return out, cache.memory_report()

    @torch.no_grad()
    def _nll(self, model, ids, chunk_size):
        chunk = chunk_size or self.chunk_size
        cache = self.new_cache(model)
        total, count = 0.0, 0
        for s in range(0, ids.shape[1] - 1, chunk):
            x = ids[:, s : s + chunk]
            y = ids[:, s + 1 : s + 1 + chunk]
            pos = torch.arange(s, s + x.shape[1], device=ids.device)
            logits = model(input_ids=x, use_cache=True, cache_position=pos, **cache_kwarg(model, cache)).logits
            logits = logits[:, : y.shape[1]]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
            count += y.numel()
            cache.compress()
        return total, count, cache.memory_report()


class _FullCache(CompressedCache):
    """The default dynamic cache with the same accounting interface (compress() does nothing)."""

    def __init__(self, model):
        super().__init__(model, _NoCodec(), mode="full")

    def compress(self) -> None:
        pass


class _NoCodec(KVCodec):
    def __init__(self):
        self.layers: list[int] = []

    def encode(self, keys, values):
        return {}

    def decode(self, layer, stored):
        raise AssertionError("the full cache stores nothing compressed")
