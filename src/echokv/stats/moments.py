"""Second moments of KV heads, streamed a block of tokens at a time in float64: the sufficient statistics of
stage 1, selection and similarity.

:class:`ValueMoments`: a mean and covariance (values, and keys before or after RoPE). :class:`KeyMoments`: the
per-frequency complex Gram matrices of post-RoPE keys (each pair of dimensions (i, i + d/2) as one complex
number, which RoPE multiplies by e^{j theta_i t}): maps between heads that commute with RoPE, for similarity.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..config import RIDGE


def to_complex(k: torch.Tensor) -> torch.Tensor:
    """[..., d] real (rotate-half layout) -> [..., d/2] complex."""
    half = k.shape[-1] // 2
    return torch.complex(k[..., :half].double(), k[..., half:].double())


class ValueMoments:
    """Mean and covariance of the values of ``n`` heads, streamed over tokens."""

    kind = "v"

    def __init__(self, n_heads: int, head_dim: int):
        self.n, self.d = n_heads, head_dim
        dim = n_heads * head_dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self._cov = None

    def add(self, x: torch.Tensor) -> None:
        """x: [N tokens, n heads, d]."""
        x = x.reshape(x.shape[0], -1).to(self.total.device, torch.float64)  # statistics stay on the CPU
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x
        self._cov = None

    def pool(self) -> None:
        """Sum the streams over data-parallel ranks (:mod:`echokv.distributed`): the moments of every rank's
        tokens."""
        self.count = distributed.sum_int(self.count)
        self.total, self.outer = distributed.all_sum(self.total), distributed.all_sum(self.outer)
        self._cov = None

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).view(self.n, self.d)

    @property
    def cov(self) -> torch.Tensor:
        if self._cov is None:  # cached: selection asks for it thousands of times
            mu = self.total / max(self.count, 1)
            self._cov = self.outer / max(self.count, 1) - torch.outer(mu, mu)
        return self._cov

    def _idx(self, heads: list[int]) -> torch.Tensor:
        cols = [torch.arange(h * self.d, (h + 1) * self.d) for h in heads]
        return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)

    def residual(self, src: list[int], tgt: list[int], ridge: float = RIDGE) -> float:
        """Expected squared error summed over ``tgt`` heads when each is predicted from ``src``."""
        cov = self.cov
        t_idx = self._idx(tgt)
        if not tgt:
            return 0.0
        c_tt = float(cov[t_idx, t_idx].sum())
        if not src:
            return c_tt
        # all targets at once: same normal equations for every target
        s_idx = self._idx(src)
        c_ss, c_st = cov[s_idx[:, None], s_idx], cov[s_idx[:, None], t_idx]
        a = c_ss + ridge * c_ss.diagonal().mean().clamp_min(1e-12) * torch.eye(len(s_idx), dtype=cov.dtype)
        w = torch.linalg.solve(a, c_st)  # [|s|, |t|]
        return c_tt - 2 * float((w * c_st).sum()) + float((w * (c_ss @ w)).sum())

    def energy(self, heads: list[int]) -> float:
        i = self._idx(heads)
        return float(self.cov[i][:, i].trace())

    def select(self, have: list[int], want: list[int]) -> ValueMoments:
        """The moments of the layers ``want`` (a subset of ``have``, the layers these moments are over, in
        ``want``'s order); features are laid out layer-major."""
        if want == have:
            return self
        width = self.n // len(have) * self.d
        idx = torch.cat([torch.arange(have.index(lay) * width, (have.index(lay) + 1) * width) for lay in want])
        out = ValueMoments(len(want) * (self.n // len(have)), self.d)
        out.count, out.total, out.outer = self.count, self.total[idx], self.outer[idx][:, idx]
        return out

    def pca(self, index: torch.Tensor | None = None, center: bool = True):
        """Principal axes of (a sub-block ``index`` of) the features.

        Returns (eigenvalues desc, basis [D, D], mean [D], energy): ``energy`` is E||x||^2 (uncentred), the
        scale errors are measured against. ``center=False`` uses the uncentred second moment (an SVD of
        the raw vectors, as Palu/xKV do) and a zero mean.
        """
        mu = self.total / max(self.count, 1)
        second = self.outer / max(self.count, 1)
        if index is not None:
            mu, second = mu[index], second[index][:, index]
        mat = second - torch.outer(mu, mu) if center else second
        evals, evecs = torch.linalg.eigh(mat)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        return evals, evecs, (mu if center else torch.zeros_like(mu)), float(second.trace())


class KeyMoments:
    """Per-frequency complex Gram matrices of post-RoPE keys of ``n`` heads."""

    kind = "k"

    def __init__(self, n_heads: int, head_dim: int):
        self.n, self.d = n_heads, head_dim
        self.count = 0
        self.gram = torch.zeros(head_dim // 2, n_heads, n_heads, dtype=torch.complex128)

    def add(self, k: torch.Tensor) -> None:
        """k: [N tokens, n heads, d], post-RoPE."""
        z = to_complex(k.to(self.gram.device))  # [N, n, F]; statistics stay on the CPU
        self.count += z.shape[0]
        self.gram += torch.einsum("nai,nbi->iab", z.conj(), z)

    def pool(self) -> None:
        """Sum the streams over data-parallel ranks (:mod:`echokv.distributed`)."""
        self.count = distributed.sum_int(self.count)
        self.gram = torch.view_as_complex(distributed.all_sum(torch.view_as_real(self.gram)).contiguous())

    def solve(self, src: list[int], tgt: int, ridge: float = RIDGE) -> torch.Tensor:
        """Complex coefficients [F, len(src)] predicting head ``tgt`` from heads ``src``."""
        if not src:
            return torch.zeros(self.d // 2, 0, dtype=torch.complex128)
        g = self.gram / max(self.count, 1)
        a = g[:, src][:, :, src]
        lam = ridge * a.diagonal(dim1=1, dim2=2).real.mean().clamp_min(1e-12)
        a = a + lam * torch.eye(len(src), dtype=a.dtype)
        return torch.linalg.solve(a, g[:, src, tgt])  # [F, |s|]

    def residual(self, src: list[int], tgt: list[int], ridge: float = RIDGE) -> float:
        g = self.gram / max(self.count, 1)
        total = 0.0
        for t in tgt:
            e = g[:, t, t].real.sum()
            if src:
                c = self.solve(src, t, ridge)  # [F, s]
                g_st = g[:, src, t]
                g_ss = g[:, src][:, :, src]
                cross = (c.conj() * g_st).sum(-1).real
                quad = torch.einsum("fa,fab,fb->f", c.conj(), g_ss, c).real
                e = e - 2 * cross.sum() + quad.sum()
            total += float(e)
        return total

    def energy(self, heads: list[int]) -> float:
        g = self.gram / max(self.count, 1)
        return float(sum(g[:, h, h].real.sum() for h in heads))
