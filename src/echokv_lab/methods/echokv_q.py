"""EchoKV-Q: per-head coded K/V read in place by a fused kernel, the fast codec (:mod:`echokv.codecs.headq`).

Fitted in ``prepare`` on the run's calibration text (seconds: one pass to collect post-RoPE K/V, a PCA per layer, kind
and head, and the byte budget allocated over the whole model by measured error); nothing is trained by gradient.

Parameters
    kernel: ``auto`` (the C++ kernel on CPU, Triton on a GPU, else PyTorch), ``cpp``, ``triton`` or ``torch``
        (:mod:`echokv.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

from echokv.codecs.headq import HeadQuantCodec, fit, token_bytes
from echokv.models import kv_geometry
from echokv_lab.methods.base import Method, register, require_calibration


@dataclass
class EchoKVQMethod(Method):
    """Per-head coded K/V, fast decode (the module docstring)."""

    name: str = "echokv-q"
    kernel: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        self._codec: HeadQuantCodec | None = None
        self._full_bytes = 0
        self._device = "cpu"

    def prepare(self, model, tokenizer, calibration) -> None:
        if self.compression_ratio == 0:
            return
        calib = require_calibration(calibration, self.name)
        self._codec = fit(model, calib.blocks, self.compression_ratio, kernel=self.kernel)
        self._device = next(model.parameters()).device
        geo = kv_geometry(model)
        self._full_bytes = 2 * geo.head_dim * geo.bytes_per_element

    def make_codec(self, model):
        return self._codec

    @property
    def achieved_kept_fraction(self) -> float | None:
        """Stored bytes over full bytes of the compressed tokens (the exact recent block comes on top, measured)."""
        if self._codec is None:
            return 1.0 if self.compression_ratio == 0 else None
        w = self._codec.widths
        return sum(token_bytes(w[layer][kind], kind) for layer in w for kind in w[layer]) / (self._full_bytes * len(w))

    def parameter_bytes(self) -> int:
        return 0 if self._codec is None else self._codec.parameter_bytes()

    def info(self) -> dict:
        out = {**super().info(), "kernel": self.kernel, "token_block": HeadQuantCodec.token_block}
        if self._codec is not None:
            out["kernel_path"] = self._codec.kernel_path(self._device)
        return out


register("echokv-q")(EchoKVQMethod)
