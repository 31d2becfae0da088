"""KV quantization: group-wise asymmetric integer codes with fp16 scales and zero-points (``quant``), and
KIVI's layout (``kivi``).

The standard family of KV quantizers (KIVI, Liu et al. 2024, arXiv 2402.02750; KVQuant, Hooper et al.
2024, arXiv 2401.18079; transformers' ``QuantizedCache``), stored as :mod:`echokv.codecs.quant` describes:
b-bit codes per group of ``group_size`` channels of a head, with a float16 scale and zero-point each.

Parameters
    bits: bits per code: 1, 2, 4, 8, 16 (16: a plain float16 copy, no scales; only a reduction for
        float32 models), or ``None`` (default): chosen from the ratio (below).
    group_size: channels per scale/zero-point (default 64; the whole head when it does not divide the
        head dim).

Bits from the ratio: the codes alone fill the budget, the scales come on top. ``bits`` is the largest width
whose codes take at most ``1 - compression_ratio`` of the full cache, ``b / (8 e) <= 1 - ratio`` for element
size ``e``: on a 16-bit (bfloat16, the default) model 0.5 -> 8 bits, 0.75 -> 4, 0.875 -> 2, 0.9375 -> 1; on a
float32 model 0.5 -> 16, 0.75 -> 8, 0.875 -> 4. The achieved kept fraction, scales and zero points included,
is ``(g*b/8 + 4) / (g*e)``, a little above the target: with g = 64 on a 16-bit model 8 bit 0.531, 4 bit 0.281,
2 bit 0.156, 1 bit 0.094 (:meth:`QuantMethod.options` lists them, :attr:`achieved_kept_fraction` is the one
used, and the cache's measured bytes say the same). A ratio above what 1 bit reaches is refused
(:class:`~echokv_lab.methods.MethodUnavailable`: "cannot reach").

``quant`` quantizes keys per token, like the values. ``kivi`` follows KIVI: keys per *channel* over groups of
``token_group`` tokens (default 64), values per token, and the tokens of the last incomplete group stay in full
precision (KIVI's residual, counted in the measured bytes, so its kept fraction is a little higher at short
contexts). The codec protocol hands a codec whole blocks to encode, so KIVI's grouping over tokens needs the
cache to flush whole token groups: :class:`KiviCache` does that by overriding the cache's flush (a codec
attribute such as ``token_block`` read by :class:`~echokv.cache.CompressedCache` would make this unnecessary).
No outlier handling (KVQuant's dense-and-sparse) and no pre-RoPE keys. transformers' own ``QuantizedCache`` is
the method ``hf-quant`` (:mod:`echokv_lab.methods.hf_quant`).
"""

from __future__ import annotations

from dataclasses import dataclass

from echokv.cache import CompressedCache
from echokv.codecs.quant import SCALE_DTYPE, KiviCodec, QuantCodec
from echokv.models import kv_geometry
from echokv_lab.methods.base import Method, MethodUnavailable, register

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


def bits_for_ratio(ratio: float, element_size: int, allowed: tuple[int, ...] = BITS) -> int | None:
    """The largest bit width of ``allowed`` whose codes fit ``1 - ratio`` of a cache of ``element_size``-byte
    numbers (None: the full precision, ratio 0); raises :class:`MethodUnavailable` when none fits."""
    if ratio <= 0:
        return None
    target = 1.0 - ratio
    fits = [b for b in allowed if b < 8 * element_size and b / (8 * element_size) <= target + 1e-9]
    if not fits:
        raise MethodUnavailable(
            f"cannot reach ratio {ratio:g}: the narrowest codes ({min(allowed)} bit) keep "
            f"{min(allowed) / (8 * element_size):.4f} of a {8 * element_size}-bit cache (plus scales)")
    return max(fits)


@dataclass
class QuantMethod(Method):
    """Per-token group-wise asymmetric KV quantization (see the module docstring)."""

    name: str = "quant"
    bits: int | None = None
    group_size: int = 64
    #: the widths :func:`bits_for_ratio` chooses from
    allowed_bits = BITS

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
        bits = self.bits
        if bits is None:
            bits = bits_for_ratio(self.compression_ratio, kv_geometry(model).bytes_per_element, self.allowed_bits)
        match = [o for o in opts if o["bits"] == bits]
        if not match:
            raise ValueError(f"{bits}-bit is no reduction for a {kv_geometry(model).dtype} model")
        return match[0]

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


class KiviCache(CompressedCache):
    """A :class:`~echokv.cache.CompressedCache` that hands its codec whole groups of ``token_group`` tokens: the
    tokens of the last, incomplete group stay in full precision (KIVI's residual)."""

    def __init__(self, model, codec: KiviCodec, **kwargs):
        super().__init__(model, codec, **kwargs)
        self.token_group = codec.token_group

    def _flush(self) -> None:
        n = min((self.layers[i].recent_length() for i in self.compressible), default=0) - self.full_window
        n -= n % self.token_group
        if n <= 0:
            return
        for gi, store in enumerate(self.stores):
            layers = [self.layers[i] for i in store.layers]
            keys = [lay.keys[:, :, :n] for lay in layers]
            values = [lay.values[:, :, :n] for lay in layers]
            store.append(self.codec.encode(gi, keys, values), n)
            for lay in layers:
                lay.drop_oldest(n)


@dataclass
class KiviMethod(QuantMethod):
    """KIVI: keys per channel over token groups, values per token, a full-precision residual (module docstring)."""

    name: str = "kivi"
    token_group: int = 64
    allowed_bits = (1, 2, 4, 8)

    def __post_init__(self):
        super().__post_init__()
        if self.bits == 16:
            raise ValueError("kivi quantizes to 1, 2, 4 or 8 bits")
        if self.token_group < 1:
            raise ValueError(f"token_group must be positive, got {self.token_group}")

    def options(self, model) -> list[dict]:
        """As ``quant``'s, without the 16-bit copy (the residual's bytes come on top, measured in a run)."""
        return [o for o in super().options(model) if o["bits"] != 16]

    def make_codec(self, model):
        if self._chosen is None:
            self.prepare(model, None, None)
        if self._chosen["bits"] is None:
            return None
        geo = kv_geometry(model)
        dtype = next(model.parameters()).dtype
        return KiviCodec(geo.full_attention_layers, self._chosen["bits"], group_for(geo.head_dim, self.group_size),
                         self.token_group, dtype)

    def new_cache(self, model):
        codec = self.make_codec(model)
        if codec is None:
            return super().new_cache(model)
        return KiviCache(model, codec, mode="full", fast=True)

    def info(self) -> dict:
        return {**super().info(), "token_group": self.token_group,
                "note": "the last incomplete token group stays in full precision (measured in kept_fraction)"}


register("quant")(QuantMethod)
register("kivi")(KiviMethod)
