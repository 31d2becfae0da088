"""Keys of EchoKV-Hybrid: a low-rank latent of a group's keys that commutes with RoPE.

EchoKV-Hybrid (EchoKV section 4) compresses keys with a low-rank method and leaves only the values
to the head-reconstruction network. Measured on SmolLM2-135M (ratio 0.5, 10 NIAH samples at 512
tokens): rebuilding discarded key heads from retained ones finds 4/10 needles with exact values,
this latent 8/10, exact keys with Echo values 10/10. Keys are what retrieval needs.

Why this form. The cache holds keys after RoPE, which multiplies frequency i of every head (the
pair of dimensions (i, i + d/2), read as one complex number z_i) by e^{j theta_i t}. A projection
commutes with that rotation at every position exactly when it acts frequency by frequency with
complex coefficients. So per group of S layers and per frequency, the complex vectors
z_i = (z_i of every head of the group) get their own principal axes (complex PCA of the calibration
Gram matrix), and the group keeps the components with the largest eigenvalues over all frequencies
("water-filling"): one complex component = two stored numbers per token. Because the latent rotates
with the keys:
- no positions are needed (left padding, any offsets: exact);
- the decode map folds into the query, so attention scores are taken in the latent space without
  rebuilding keys (:mod:`echokv.fast_attention`).
The price is that frequencies cannot be mixed: pre-RoPE PCA (the low-rank baseline) reconstructs
keys better (held-out relative error 0.005 vs 0.045 at S=4, 50% of the keys, measured) but needs
the positions and an explicit rebuild of every past key at every decode step.

Real form. With u = p + jq a unit complex axis, a head's key laid out as [Re z | Im z] (rotate-half),
the component c = u^H z is the pair (e1 . x, e2 . x) with e1 = [p; q], e2 = [-q; p]; e1, e2 are
orthonormal and x_hat = e1 c_re + e2 c_im. The basis is stored as one real matrix B [S*H*d, r] with
orthonormal columns: latent y = x B, keys x_hat = y B^T.
"""

from __future__ import annotations

import torch

from .moments import KeyMoments


def latent_dims(n_heads: int, head_dim: int, ratio: float) -> int:
    """Stored numbers per token for a group of ``n_heads`` keys at compression ``ratio`` (even)."""
    return 2 * round((1.0 - ratio) * n_heads * (head_dim // 2))


def fit_basis(moments: KeyMoments, dims: int) -> tuple[torch.Tensor, float]:
    """Real orthonormal basis [n*d, dims] of the top complex components, and the calibration
    relative error of the projection (discarded eigenvalue mass over the total)."""
    n, d = moments.n, moments.d
    f = d // 2
    gram = moments.gram / max(moments.count, 1)  # [F, n, n], entries E[conj(z_a) z_b]
    # z as a column vector has covariance E[z z^H] = conj(gram)
    evals, evecs = torch.linalg.eigh(gram.conj())
    evals = evals.clamp_min(0)
    keep = dims // 2
    order = evals.flatten().argsort(descending=True)[:keep]
    total = float(evals.sum())
    err = 1.0 - float(evals.flatten()[order].sum()) / max(total, 1e-30)
    basis = torch.zeros(n, d, 2 * keep, dtype=torch.float64)
    for c, flat in enumerate(sorted(order.tolist())):  # sorted: frequency-major, stable across runs
        i, col = divmod(flat, n)
        u = evecs[i][:, col]
        p, q = u.real, u.imag
        basis[:, i, 2 * c], basis[:, f + i, 2 * c] = p, q
        basis[:, i, 2 * c + 1], basis[:, f + i, 2 * c + 1] = -q, p
    return basis.reshape(n * d, 2 * keep).float(), err


def encode(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Keys of a group [B, n, T, d] -> latent [B, 1, T, r]."""
    b, n, t, d = x.shape
    return (x.transpose(1, 2).reshape(b, t, n * d) @ basis.to(x.dtype)).unsqueeze(1)


def decode(y: torch.Tensor, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Latent [B, 1, T, r] and the basis rows of some heads [h*d, r] -> their keys [B, h, T, d]."""
    out = y[:, 0] @ rows.to(y.dtype).T  # [B, T, h*d]
    return out.unflatten(-1, (-1, head_dim)).transpose(1, 2)
