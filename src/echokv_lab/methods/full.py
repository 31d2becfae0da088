"""The uncompressed cache: the reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from echokv_lab.methods.base import Method, register


@dataclass
class FullMethod(Method):
    """transformers' default cache, with the shared accounting (compression ratio 0)."""

    @classmethod
    def create(cls, ratio, artifacts=None, **kwargs):
        return cls(0.0, **kwargs)  # runs once, uncompressed, whatever the run's ratios


register("full")(FullMethod)
