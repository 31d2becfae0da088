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
  rebuilding keys (:mod:`echokv.codecs.echo`).
The price is that frequencies cannot be mixed: pre-RoPE PCA (the low-rank baseline) reconstructs
keys better (held-out relative error 0.005 vs 0.045 at S=4, 50% of the keys, measured) but needs
the positions and an explicit rebuild of every past key at every decode step.

Real form. With u = p + jq a unit complex axis, a head's key laid out as [Re z | Im z] (rotate-half),
the component c = u^H z is the pair (e1 . x, e2 . x) with e1 = [p; q], e2 = [-q; p]; e1, e2 are
orthonormal and x_hat = e1 c_re + e2 c_im. The basis is used as one real matrix B [S*H*d, r] with
orthonormal columns: latent y = x B, keys x_hat = y B^T. Artifacts store its complex form (the
frequency and the unit axis u of each component: n*r + r/2 numbers instead of n*d*r), which is also
what counts as its size (:func:`complex_form`).
"""

from __future__ import annotations

import torch

from .stats.moments import KeyMoments


def latent_dims(n_heads: int, head_dim: int, ratio: float) -> int:
    """Stored numbers per token for a group of ``n_heads`` keys at compression ``ratio`` (even)."""
    return 2 * round((1.0 - ratio) * n_heads * (head_dim // 2))


def fit_basis(moments: KeyMoments, dims: int) -> tuple[torch.Tensor, float]:
    """Real orthonormal basis [n*d, dims] of the top complex components, and the calibration
    relative error of the projection (discarded eigenvalue mass over the total)."""
    n, d = moments.n, moments.d
    gram = moments.gram / max(moments.count, 1)  # [F, n, n], entries E[conj(z_a) z_b]
    # z as a column vector has covariance E[z z^H] = conj(gram)
    evals, evecs = torch.linalg.eigh(gram.conj())
    evals = evals.clamp_min(0)
    keep = dims // 2
    order = evals.flatten().argsort(descending=True)[:keep]
    total = float(evals.sum())
    err = 1.0 - float(evals.flatten()[order].sum()) / max(total, 1e-30)
    flat = order.sort().values  # frequency-major, stable across runs
    freq, col = flat // n, flat % n
    u = evecs[freq, :, col]  # [keep, n]: the unit axis of each kept component
    axes = torch.stack([u.real, u.imag], -1)  # [keep, n, 2]
    return from_complex_form(freq, axes, d).float(), err


def encode(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Keys of a group [B, n, T, d] -> latent [B, 1, T, r]."""
    b, n, t, d = x.shape
    return (x.transpose(1, 2).reshape(b, t, n * d) @ basis.to(x.dtype)).unsqueeze(1)


def decode(y: torch.Tensor, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Latent [B, 1, T, r] and the basis rows of some heads [h*d, r] -> their keys [B, h, T, d]."""
    out = y[:, 0] @ rows.to(y.dtype).T  # [B, T, h*d]
    return out.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def complex_form(basis: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The compact form of a basis made by :func:`fit_basis`: ``freq`` [r/2] (int32) and ``axes``
    [r/2, n, 2] (p, q of each component's unit axis); None when ``basis`` is not of that form."""
    nd, r = basis.shape
    d, f = head_dim, head_dim // 2
    if r % 2 or nd % d:
        return None
    cols = basis.reshape(nd // d, d, r)
    first = cols[..., 0::2]  # [n, d, r/2]: column e1 = [p; q] of each component
    freq = (first[:, :f].abs() + first[:, f:].abs()).sum(0).argmax(0)  # [r/2]
    idx = freq[None, None, :].expand(cols.shape[0], 1, -1)
    p = first[:, :f].gather(1, idx)[:, 0]  # [n, r/2]
    q = first[:, f:].gather(1, idx)[:, 0]
    axes = torch.stack([p, q], -1).transpose(0, 1).contiguous()  # [r/2, n, 2]
    freq = freq.to(torch.int32)
    return (freq, axes) if torch.equal(from_complex_form(freq, axes, head_dim).to(basis.dtype), basis) else None


def from_complex_form(freq: torch.Tensor, axes: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The dense real basis [n*d, r] of a complex form (inverse of :func:`complex_form`)."""
    k, n, _ = axes.shape
    d, f = head_dim, head_dim // 2
    p, q = axes[..., 0].T, axes[..., 1].T  # [n, r/2]
    basis = torch.zeros(n, d, 2 * k, dtype=axes.dtype)
    cols = torch.arange(k)
    fr = freq.long()
    basis[:, fr, 2 * cols], basis[:, f + fr, 2 * cols] = p, q
    basis[:, fr, 2 * cols + 1], basis[:, f + fr, 2 * cols + 1] = -q, p
    return basis.reshape(n * d, 2 * k)


def stored_numel(basis: torch.Tensor, head_dim: int) -> int:
    """Numbers an artifact stores for ``basis`` (its complex form when it has one)."""
    form = complex_form(basis, head_dim)
    return basis.numel() if form is None else form[0].numel() + form[1].numel()
