"""What every codec's fast decode path shares: attention weights over [compressed past, recent tokens].

Query heads are handled as [B, H, n_rep * Tq, d] (the n_rep query heads of a KV head are rows of one matrix), so
no K/V head is ever repeated or gathered; a codec computes the scores of the past its own way, then calls
:func:`attention_weights`.
"""

from __future__ import annotations

import torch


def attention_weights(past: torch.Tensor, qh: torch.Tensor, recent_k: torch.Tensor, mask, scaling: float,
                      tq: int) -> torch.Tensor:
    """Softmax weights [B, H, rows, Tc + Tr] from the past's scores ``past`` [B, H, rows, Tc] and the queries
    ``qh`` [B, H, rows, d] against the recent keys [B, H, Tr, d]. ``mask``: transformers' SDPA mask
    ([B, 1, Tq, Tc + Tr], bool or additive) or None (causal, aligned to the end)."""
    b, h, rows, tc = past.shape
    tr = recent_k.shape[-2]
    logits = torch.cat([past, qh @ recent_k.transpose(-1, -2)], dim=-1).mul_(scaling)
    if mask is not None or tq > 1:
        shaped = logits.view(b, h, rows // tq, tq, tc + tr)
        if mask is None:
            keep = torch.ones(tq, tc + tr, dtype=torch.bool, device=qh.device).tril(tc + tr - tq)
            shaped.masked_fill_(~keep, float("-inf"))
        elif mask.dtype == torch.bool:
            shaped.masked_fill_(~mask[:, :, None], float("-inf"))
        else:
            shaped.add_(mask[:, :, None])
    return torch.softmax(logits.float(), dim=-1).to(qh.dtype)
