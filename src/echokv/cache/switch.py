"""When a cache leaves full mode: its mode and the conditions of auto mode (a token count, a byte budget)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

from ..config import CACHE_MODES


def is_count(x, low: int) -> bool:
    """An integer (not a bool: ``True`` is not a token count) of at least ``low``."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low


@dataclass
class Switch:
    """``mode`` is ``"full"`` (compresses only when asked), ``"compressed"`` (from the first token) or ``"auto"``:
    full until the context holds ``at_tokens`` tokens or the cache more than ``budget_bytes`` bytes. The
    messages name the cache's arguments (``switch_at_tokens``, ``memory_budget_bytes``)."""

    mode: str = "auto"
    at_tokens: int | None = None
    budget_bytes: int | None = None

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(CACHE_MODES)}")
        if self.at_tokens is not None and not is_count(self.at_tokens, 1):
            raise ValueError(f"switch_at_tokens must be a positive integer, got {self.at_tokens!r}")
        if self.budget_bytes is not None and not is_count(self.budget_bytes, 1):
            raise ValueError(f"memory_budget_bytes must be a positive integer, got {self.budget_bytes!r}")
        if self.mode == "auto" and self.at_tokens is None and self.budget_bytes is None:
            raise ValueError("mode 'auto' needs switch_at_tokens or memory_budget_bytes")
        if self.mode != "auto" and (self.at_tokens is not None or self.budget_bytes is not None):
            given = "switch_at_tokens" if self.at_tokens is not None else "memory_budget_bytes"
            raise ValueError(f"{given} sets when auto mode switches, but mode {self.mode!r} never switches; pass "
                             f"mode='auto' (the default when {given} is given) or leave {given} out")
        self.at_tokens = None if self.at_tokens is None else int(self.at_tokens)
        self.budget_bytes = None if self.budget_bytes is None else int(self.budget_bytes)

    def due(self, tokens: int, nbytes: Callable[[], int]) -> bool:
        """Whether auto mode switches now, at ``tokens`` held (``nbytes``: the cache's bytes, read only if needed)."""
        if self.mode != "auto":
            return False
        if self.at_tokens is not None and tokens >= self.at_tokens:
            return True
        return self.budget_bytes is not None and nbytes() > self.budget_bytes
