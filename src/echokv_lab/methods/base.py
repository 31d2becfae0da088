"""What every method the evaluation harness runs shares: the :class:`Method` base and the registry.

A :class:`Method` (kvpress-style: one dataclass of parameters per file) has a name, a compression ratio, and
two hooks: :meth:`Method.prepare` fits what it needs (bases, artifacts) and :meth:`Method.make_codec` returns
the :class:`~echokv.cache.codec.KVCodec` deciding what compressed tokens become (``None``: the full cache).
Everything else, prefill, compression, decoding, memory accounting, is the shared
:class:`~echokv.cache.CompressedCache`, so methods are compared through the same KV plumbing.
:meth:`Method.info` reports what the method is (achieved kept fraction, parameter bytes, its own parameters);
the evaluation writes it into every result row.

Protocol of one evaluation sample (as kvpress does it): the context is prefilled with exact attention
within each chunk, the cache is compressed, then the question and the answer are decoded through the
compressed cache. Perplexity streams text in chunks, every chunk attending to the compressed past.
Methods that do not fit this mould (kvpress presses) override :meth:`generate` / :meth:`nll`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from echokv.attention import echokv_attention
from echokv.cache import CompressedCache, FullCache, KVCodec
from echokv.generation import PREFILL_CHUNK, nll, prefill
from echokv.placement import input_device
from echokv.selection import check_ratio
from echokv.stats.collect import Calibration

#: method name -> (class, the keyword arguments that name stands for); see :func:`register`
REGISTRY: dict[str, tuple[type, dict]] = {}


def register(name: str, **defaults):
    """``register(name, **defaults)(cls)`` (or ``@register(name)``): ``make_method(name, ratio, **kw)`` makes
    ``cls.create(ratio, name=name, **defaults, **kw)``. Each method file registers its names at its end."""

    def add(cls):
        REGISTRY[name] = (cls, {"name": name, **defaults})
        return cls

    return add


class MethodUnavailable(RuntimeError):
    """The method cannot run here (missing package, unsupported model); the message says why."""


def require_calibration(calibration, who: str) -> Calibration:
    if calibration is None or getattr(calibration, "blocks", None) is None or len(calibration.blocks) == 0:
        raise ValueError(f"{who} needs calibration data (Calibration(blocks=[N, T] token ids)) in prepare()")
    return calibration


@dataclass
class Method:
    """Base class: the full cache. Subclasses override :meth:`make_codec` (and maybe :meth:`prepare`)."""

    compression_ratio: float = 0.0
    name: str = "full"
    chunk_size: int = PREFILL_CHUNK

    def __post_init__(self):
        check_ratio(self.compression_ratio)

    @classmethod
    def create(cls, ratio: float, artifacts: list[str] | None = None, **kwargs) -> Method:
        """The method at ``ratio``; methods that use the run's EchoKV ``artifacts`` pick theirs here."""
        return cls(ratio, **kwargs)

    @property
    def label(self) -> str:
        return self.name if self.compression_ratio == 0 else f"{self.name}@{self.compression_ratio:g}"

    # -- the hooks --------------------------------------------------------------------------------------
    def prepare(self, model, tokenizer, calibration: Calibration | None) -> None:
        """Fit whatever the method needs (bases, artifacts). Called once before the samples."""

    def make_codec(self, model) -> KVCodec | None:
        """The codec for compressed tokens; ``None`` keeps the full cache."""
        return None

    # -- reporting ----------------------------------------------------------------------------------------
    @property
    def achieved_kept_fraction(self) -> float | None:
        """The fraction of the K/V the cache keeps (1.0 for the full cache; None where only a run measures it)."""
        return 1.0

    def parameter_bytes(self) -> int:
        """Bytes the method holds once for the model (bases, networks), apart from the cache."""
        return 0

    def info(self) -> dict:
        """What the method is, for ``results.json``: label, kept fraction, parameter bytes, its parameters."""
        return {"method": self.label, "achieved_kept_fraction": self.achieved_kept_fraction,
                "parameter_bytes": self.parameter_bytes()}

    # -- running ------------------------------------------------------------------------------------------
    def new_cache(self, model):
        codec = self.make_codec(model)
        if codec is None:
            return FullCache(model)
        return CompressedCache(model, codec, mode="full", fast=True)

    def generate(self, model, context_ids, question_ids, max_new_tokens: int, eos_ids=()):
        """Greedy answer to one sample. Returns (new token ids, cache memory report)."""
        with echokv_attention(model):  # the fast decode path of codecs that have one, only for this call
            return self._generate(model, context_ids, question_ids, max_new_tokens, eos_ids)

    def nll(self, model, ids: torch.Tensor, chunk_size: int | None = None) -> tuple[float, int, dict]:
        """Summed next-token NLL of ``ids`` [1, T] decoded chunk by chunk through the compressed cache."""
        with echokv_attention(model):
            return self._nll(model, ids, chunk_size)

    @torch.no_grad()
    def _generate(self, model, context_ids, question_ids, max_new_tokens, eos_ids):
        device = input_device(model)
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
        cache = self.new_cache(model)
        total, count = nll(model, cache, ids, chunk_size or self.chunk_size)
        return total, count, cache.memory_report()
