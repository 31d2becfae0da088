"""Attention over an EchoKV-compressed past without rebuilding the discarded heads.

Both reconstructions are linear in the retained heads X (the cache's post-RoPE keys / values):
    k_hat = X_k M        ->  q . k_hat_t = (q M^T) . x_t      fold M into the query
    v_hat = X_v W + b    ->  sum_t p_t v_hat_t = (sum_t p_t x_t) W + b sum_t p_t
so one decode step reads only the retained heads: the query of a discarded head is mapped into the
space of the group's retained heads, scores are taken there, and the value map is applied once to the
attention-weighted sum instead of to every past token. The key map commutes with RoPE
(:mod:`echokv.moments`), which is what makes folding it into the query exact.

EchoKV-Hybrid stores keys as a latent y = x B (:mod:`echokv.key_latent`), decoded by the layer's rows
R of B: q . k_hat_t = (q R^T) . y_t, so every query is folded into the latent space the same way.

The explicit reconstruction (:meth:`Reconstructor.rebuild`) stays the reference; tests check both give
the same logits.
"""

from __future__ import annotations

import torch


def key_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complex per-frequency coefficients a + jb [..., f] -> real [..., d_in, d_out] (rotate-half layout)."""
    f = a.shape[-1]
    m = a.new_zeros(*a.shape[:-1], 2 * f, 2 * f)
    i = torch.arange(f)
    m[..., i, i] = a
    m[..., i + f, i] = -b
    m[..., i, i + f] = b
    m[..., i + f, i + f] = a
    return m


class LayerPlan:
    """What one layer needs: which of the group's retained heads are its own, and the folded maps."""

    def __init__(self, recon, layer: int):
        lay = recon.layout
        gi = lay.group_of(layer)
        group = lay.groups[gi]
        mod = recon.groups[gi]
        self.num_kv_heads = lay.num_kv_heads
        for kind in ("k", "v"):
            src = lay.sources(kind, group)
            own = [j for j, (sl, _) in enumerate(src) if sl == layer]
            heads = [h for (_, h) in (src[j] for j in own)]
            tgt = lay.targets(kind, group)
            rows = [r for r, (tl, _) in enumerate(tgt) if tl == layer]
            setattr(self, f"{kind}_own", torch.tensor(own, dtype=torch.long))
            setattr(self, f"{kind}_own_heads", heads)
            setattr(self, f"{kind}_tgt_heads", [tgt[r][1] for r in rows])
            if kind == "k":
                self.k_map = mod.key_maps()[rows].detach()  # [n_tgt, n_src, d_in, d_out]
            else:
                self.v_map = mod.value_maps()[rows].detach()
                self.v_bias = mod.v_bias[rows].detach()
        self.k_fold = None
        if lay.hybrid:  # keys are a latent: every query head is folded, none is scored as is
            self.k_own_heads, self.k_tgt_heads = [], []
            rows = recon.key_rows(layer).detach()
            self.k_fold = rows.view(lay.num_kv_heads, recon.head_dim, rows.shape[-1])  # [H, d, r]


def _query_rows(heads: list[int], n_rep: int) -> list[int]:
    return [h * n_rep + r for h in heads for r in range(n_rep)]


def attend(plan: LayerPlan, q, recent_k, recent_v, group_k, group_v, mask, scaling) -> torch.Tensor:
    """Attention output [B, Tq, Hq, d] over [compressed past, recent] for one layer.

    q [B, Hq, Tq, d]; recent_k/v [B, H, Tr, d] (full heads, includes the new tokens);
    group_k/v [B, n_src, Tc, d] (retained heads of the layer's group); mask: transformers' SDPA mask
    ([B, 1, Tq, Tc + Tr], bool or additive) or None (causal, aligned to the end).
    """
    b, hq, tq, d = q.shape
    h = plan.num_kv_heads
    n_rep = hq // h
    tc, tr = group_k.shape[-2], recent_k.shape[-2]
    dtype = q.dtype
    scores = q.new_empty(b, hq, tq, tc)
    # retained key heads of this layer: plain scores
    if plan.k_own_heads:
        rows = _query_rows(plan.k_own_heads, n_rep)
        kr = group_k[:, plan.k_own].repeat_interleave(n_rep, 1)  # [B, rows, Tc, d] view-sized copy
        scores[:, rows] = q[:, rows] @ kr.transpose(-1, -2)
    # discarded key heads: fold the map into the query, score against every source head, sum
    if plan.k_tgt_heads:
        rows = _query_rows(plan.k_tgt_heads, n_rep)
        qt = q[:, rows].view(b, len(plan.k_tgt_heads), n_rep * tq, d)
        folded = torch.einsum("btre,tsde->bstrd", qt, plan.k_map.to(dtype))  # query in each source's space
        folded = folded.reshape(b, group_k.shape[1], len(rows) * tq, d)
        part = (folded @ group_k.transpose(-1, -2)).sum(1)  # [B, rows*Tq, Tc]
        scores[:, rows] = part.view(b, len(rows), tq, tc)
    if plan.k_fold is not None:  # hybrid: group_k is the latent [B, 1, Tc, r]
        folded = q.reshape(b, h, n_rep * tq, d) @ plan.k_fold.to(dtype)  # [B, H, n_rep*Tq, r]
        scores = (folded.reshape(b, 1, hq * tq, -1) @ group_k.transpose(-1, -2)).view(b, hq, tq, tc)
    recent = q @ recent_k.repeat_interleave(n_rep, 1).transpose(-1, -2)
    logits = torch.cat([scores, recent], dim=-1) * scaling
    if mask is None:
        keep = torch.ones(tq, tc + tr, dtype=torch.bool, device=q.device).tril(tc + tr - tq)
        logits = logits.masked_fill(~keep, float("-inf"))
    elif mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask
    p = torch.softmax(logits.float(), dim=-1).to(dtype)
    p_past, p_recent = p[..., :tc], p[..., tc:]
    out = p_recent @ recent_v.repeat_interleave(n_rep, 1)  # [B, Hq, Tq, d]
    if plan.v_own_heads:
        rows = _query_rows(plan.v_own_heads, n_rep)
        out[:, rows] += p_past[:, rows] @ group_v[:, plan.v_own].repeat_interleave(n_rep, 1)
    if plan.v_tgt_heads:
        rows = _query_rows(plan.v_tgt_heads, n_rep)
        pt = p_past[:, rows].reshape(b, 1, len(rows) * tq, tc)
        mixed = (pt @ group_v).view(b, group_v.shape[1], len(plan.v_tgt_heads), n_rep * tq, d)
        val = torch.einsum("bstrd,tsde->btre", mixed, plan.v_map.to(dtype))
        mass = p_past[:, rows].sum(-1).view(b, len(plan.v_tgt_heads), n_rep * tq, 1)
        val = val + mass * plan.v_bias.to(dtype)[None, :, None, :]
        out[:, rows] += val.reshape(b, len(rows), tq, d)
    return out.transpose(1, 2).contiguous()
