"""transformers' own ``QuantizedCache`` (KIVI-style, the cache users already know), as the method ``hf-quant``.

Backend: HQQ (``pip install hqq``, the ``hfquant`` extra). Both of transformers' integer backends were tried on this
CPU (torch 2.13, transformers 5.24, a tiny bfloat16 Llama, 600-token prompt + 100 decode steps): optimum-quanto
0.2.7 runs, but offers 2 and 4 bits only (no 8 bits, so ratio 0.5 of a bfloat16 cache is out of reach) and
compiles a C++ extension with ninja on first use (minutes); HQQ 0.2.8 is plain PyTorch on CPU, offers 1, 2, 3,
4 and 8 bits, and its quantized state is plain tensors whose bytes :mod:`echokv.cache.accounting` counts.

Parameters
    bits: 1, 2, 3, 4 or 8, or ``None`` (default): the largest width whose codes fit ``1 - compression_ratio`` of
        the cache (bfloat16: 0.5 -> 8, 0.75 -> 4, 0.875 -> 2; as :func:`echokv_lab.methods.quant.bits_for_ratio`).
    group_size: ``q_group_size`` (default 64). axis: ``axis_key`` / ``axis_value`` (default 0, transformers').
    residual_length: tokens kept in full precision before they are quantized (default 32; transformers'
        default is 128, which at the quick suite's 512-1024 tokens would keep a quarter of the cache unquantized).

How it differs from ``quant``/``kivi``: every ``residual_length`` tokens transformers dequantizes the whole
cache, appends the residual and quantizes everything again (so the codes of old tokens are re-rounded, and the
work grows with the context); scales and zero points are in the model's dtype. Its bytes are measured
(``kept_fraction`` of a run); :attr:`achieved_kept_fraction` is the estimate without the residual.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from echokv.cache import accounting
from echokv.models import kv_geometry
from echokv_lab.methods.base import Method, MethodUnavailable, register
from echokv_lab.methods.quant import group_for

HQQ_BITS = (1, 2, 3, 4, 8)


def _quantized_cache_class():
    try:
        from transformers import QuantizedCache
    except ImportError as exc:  # pragma: no cover - every supported transformers has it
        raise MethodUnavailable(f"this transformers has no QuantizedCache: {exc}") from exc

    class MeasuredQuantizedCache(QuantizedCache):
        """transformers' QuantizedCache with the shared cache's reporting interface."""

        def compress(self) -> None:
            """Nothing to switch: it quantizes as tokens arrive (every ``residual_length`` tokens)."""

        def memory_report(self) -> dict:
            # accounting.full_nbytes needs a 4-D tensor in each layer; HQQ packs its codes 2-D and the residual is
            # empty right after a flush, so the full bytes come from the geometry and the token count here
            geo, tokens = self.geometry, self.get_seq_length()
            batch = next((t.shape[0] for t in accounting.held(self) if t.dim() == 4), 1)
            full = 2 * geo.num_layers * batch * geo.num_kv_heads * tokens * geo.head_dim * geo.bytes_per_element
            now = accounting.nbytes(self)
            return {"mode": "compressed", "switched_at": 0, "tokens": self.get_seq_length(), "cache_bytes": now,
                    "reserved_bytes": accounting.reserved_nbytes(self), "full_cache_bytes": full,
                    "kept_fraction": now / full if full else 1.0}

    return MeasuredQuantizedCache


def hqq_available() -> bool:
    return importlib.util.find_spec("hqq") is not None


@dataclass
class HFQuantMethod(Method):
    """transformers' ``QuantizedCache`` with the HQQ backend (see the module docstring)."""

    name: str = "hf-quant"
    bits: int | None = None
    group_size: int = 64
    axis: int = 0
    residual_length: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.bits is not None and self.bits not in HQQ_BITS:
            raise ValueError(f"bits must be one of {HQQ_BITS} or None (from the ratio), got {self.bits!r}")
        self._bits: int | None = None
        self._element = 2

    @classmethod
    def create(cls, ratio, artifacts=None, **kwargs):
        if not hqq_available():
            raise MethodUnavailable("hf-quant needs the HQQ backend of transformers' QuantizedCache: "
                                    "pip install 'echokv[hfquant]' (hqq)")
        return cls(ratio, **kwargs)

    def prepare(self, model, tokenizer, calibration) -> None:
        geo = kv_geometry(model)
        if geo.sliding_layers:
            raise MethodUnavailable("transformers' QuantizedCache supports full-attention layers only "
                                    f"({geo.model_type} has sliding-window layers {geo.sliding_layers})")
        self._element = geo.bytes_per_element
        if self.compression_ratio == 0:
            self._bits = None
            return
        if self.bits is not None:
            self._bits = self.bits
            return
        target = 1.0 - self.compression_ratio
        fits = [b for b in HQQ_BITS if b < 8 * self._element and b / (8 * self._element) <= target + 1e-9]
        if not fits:
            raise MethodUnavailable(f"cannot reach ratio {self.compression_ratio:g}: HQQ's 1-bit codes keep "
                                    f"{1 / (8 * self._element):.4f} of a {8 * self._element}-bit cache")
        self._bits = max(fits)

    def new_cache(self, model):
        if self._bits is None:
            return super().new_cache(model)
        cls = _quantized_cache_class()
        # HQQ needs the group to divide the tensor's size: a divisor of head_dim always does
        group = group_for(kv_geometry(model).head_dim, self.group_size)
        cache = cls("hqq", model.config, nbits=self._bits, axis_key=self.axis, axis_value=self.axis,
                    q_group_size=group, residual_length=self.residual_length)
        cache.geometry = kv_geometry(model)
        return cache

    @property
    def achieved_kept_fraction(self) -> float:
        if self._bits is None:
            return 1.0
        g, e = self.group_size, self._element
        return (g * self._bits / 8 + 2 * e) / (g * e)  # codes + scale and zero in the model's dtype; no residual

    def info(self) -> dict:
        return {**super().info(), "backend": "hqq", "bits": self._bits, "group_size": self.group_size,
                "residual_length": self.residual_length, "target_kept_fraction": 1.0 - self.compression_ratio}


register("hf-quant")(HFQuantMethod)
