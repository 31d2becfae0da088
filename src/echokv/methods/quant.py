"""KV quantization: per-token, group-wise asymmetric integer codes with fp16 scales and zero-points.

The standard family of KV quantizers (KIVI, Liu et al. 2024, arXiv 2402.02750; KVQuant, Hooper et al.
2024, arXiv 2401.18079; transformers' ``QuantizedCache``), stored as :mod:`echokv.codecs.quant` describes:
b-bit codes per group of ``group_size`` channels of a head, with a float16 scale and zero-point each.

Parameters
    bits: bits per code: 1, 2, 4, 8, 16 (16: a plain float16 copy, no scales; only a reduction for
        float32 models), or ``None`` (default): the option whose kept fraction, scales included, is
        nearest to ``1 - compression_ratio`` for the model's dtype (ratio 0: full precision).
    group_size: channels per scale/zero-point (default 32; the whole head when it does not divide the
        head dim).

Kept fraction (scales included), ``(g*b/8 + 4) / (g*e)`` for element size e and group g, e.g. with
g = 32: float32 models: 16 bit 0.5, 8 bit 0.281, 4 bit 0.156, 2 bit 0.094, 1 bit 0.063; 16-bit
models: 8 bit 0.563, 4 bit 0.313, 2 bit 0.188, 1 bit 0.125. :meth:`options` lists them for a model,
:attr:`achieved_kept_fraction` is the one used.

Simplified vs KIVI: keys are quantized per token like the values (KIVI quantizes keys per channel
across groups of tokens, with a full-precision residual of recent tokens, which needs tokens to be
buffered in groups); no outlier handling (KVQuant's dense-and-sparse) and no pre-RoPE keys.
transformers' ``QuantizedCache`` (optimum-quanto 0.2.7 backend) does install and run on this CPU,
but offers 2/4 bits only and re-quantizes its whole cache every ``residual_length`` tokens, so this
codec, which plugs into the shared cache like every other baseline, is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..codecs.quant import SCALE_DTYPE, QuantCodec
from ..models import kv_geometry
from .base import Method, register

BITS = (1, 2, 4, 8, 16)


def group_for(head_dim: int, group_size: int) -> int:
    return group_size if 0 < group_size <= head_dim and head_dim % group_size == 0 else head_dim


def kept_fraction(bits: int | None, element_size: int, group: int) -> float:
    """Stored bytes over full bytes for ``bits`` (None: full precision)."""
    if bits is None or 8 * element_size <= bits:
        return 1.0
    if bits == 16:
        return 2 / element_size
    scale_bytes = 2 * SCALE_DTYPE.itemsize
    return (group * bits / 8 + scale_bytes) / (group * element_size)


@dataclass
class QuantMethod(Method):
    """Per-token group-wise asymmetric KV quantization (see the module docstring)."""

    name: str = "quant"
    bits: int | None = None
    group_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.bits is not None and self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS} or None (from the ratio), got {self.bits!r}")
        self._chosen: dict | None = None

    def options(self, model) -> list[dict]:
        """Every bit width with the kept fraction it gives on ``model`` (scales included)."""
        geo = kv_geometry(model)
        e, g = geo.bytes_per_element, group_for(geo.head_dim, self.group_size)
        opts = [{"bits": None, "label": f"{8 * e}-bit (full)", "kept_fraction": 1.0}]
        for b in BITS:
            if b < 8 * e:
                opts.append({"bits": b, "label": f"{b}-bit", "kept_fraction": kept_fraction(b, e, g)})
        return opts

    def choose(self, model) -> dict:
        opts = self.options(model)
        if self.bits is not None:
            match = [o for o in opts if o["bits"] == self.bits]
            if not match:
                raise ValueError(f"{self.bits}-bit is no reduction for a {kv_geometry(model).dtype} model")
            return match[0]
        target = 1.0 - self.compression_ratio
        return min(opts, key=lambda o: (round(abs(o["kept_fraction"] - target), 12), o["kept_fraction"]))

    def prepare(self, model, tokenizer, calibration) -> None:
        self._chosen = self.choose(model)

    def make_codec(self, model):
        if self._chosen is None:
            self.prepare(model, None, None)
        geo = kv_geometry(model)
        dtype = next(model.parameters()).dtype
        return QuantCodec(geo.full_attention_layers, self._chosen["bits"], group_for(geo.head_dim, self.group_size),
                          dtype)

    # -- reporting --------------------------------------------------------------------------------
    @property
    def achieved_kept_fraction(self) -> float:
        if self._chosen is None:
            raise RuntimeError(f"{self.name}: call prepare() first")
        return self._chosen["kept_fraction"]

    def info(self) -> dict:
        return {
            **super().info(),
            "bits": self._chosen["bits"] if self._chosen else self.bits,
            "group_size": self.group_size,
            "target_kept_fraction": 1.0 - self.compression_ratio,
        }


register("quant")(QuantMethod)
