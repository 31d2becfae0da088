"""The decode attention over per-head coded K/V, in plain PyTorch: the specification every kernel is tested against,
and the path taken where no compiled kernel runs.

Stored layout, per layer and kind (keys or values), for B sequences, H KV heads and T stored tokens: the head's
channels, in the codec's basis, are cut into contiguous *classes* of one width each, in the order of ``widths``
(``((16, n16), (8, n8), (4, n4), (2, n2))``, any of them absent or 0); channels past the last class are dropped (zero).
``store`` holds, for a class of width w:

* w = 16: ``store["16"]`` [B, H, T, n16], bfloat16 or float16 values;
* w = 8, 4 or 2: ``store[f"{w}"]`` [B, H, T, n * w / 8] uint8 codes (4-bit: two per byte, the even channel in the
  low nibble, n even; 2-bit: four per byte, channel 4i + j in bits 2j and 2j + 1, n a multiple of 4), and
  ``store[f"{w}.s"]``, ``store[f"{w}.z"]`` float16 scale and zero point, either per token
  ([B, H, T]: one per token and head, the channel value is ``code * s[t] + z[t]``) or per channel and block of
  :data:`BLOCK` tokens ([B, H, ceil(T / BLOCK), n]: row j holds tokens ``j * BLOCK`` to ``(j + 1) * BLOCK - 1``, the
  value is ``code * s[j, c] + z[j, c]``; KIVI's layout for keys, whose channels differ in range).

Tensors may be views into larger buffers (strided on every axis but the last, which is contiguous).

:func:`attend` computes, per sequence b, KV head h and query row r (the query heads of a KV head times the query
positions), over the stored tokens t with ``mask[b, t]`` (all, without a mask):

    score[t] = q[b, h, r] . key[b, h, t]            (q already in the key basis and multiplied by the scaling)
    lse      = log sum_t exp(score[t])
    out      = sum_t softmax(score)[t] * value[b, h, t]   (value components, in the value basis)

and returns ``out`` [B, H, R, n_v] and ``lse`` [B, H, R], both float32 (n_v: the values' kept channels). A row with
no visible token gets ``out`` 0 and ``lse`` -inf, so that merging it with other parts by log-sum-exp is exact.
"""

from __future__ import annotations

import torch

from ..quantize import round_fp16

WIDTHS = (16, 8, 4, 2)
#: tokens per row of a per-channel scale (the kernels' token block)
BLOCK = 64


def kept(widths) -> int:
    """Channels kept by the classes ``widths``."""
    return sum(n for _, n in widths)


def unpack4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n/2] uint8 -> [..., n] uint8 (even channel in the low nibble)."""
    return torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)


def unpack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n * width / 8] uint8 -> [..., n] uint8: 8 bit as they are; 4 bit :func:`unpack4`; 2 bit four channels per
    byte, channel 4i + j in bits 2j, 2j + 1 of byte i."""
    if width == 8:
        return codes
    if width == 4:
        return unpack4(codes)
    return torch.stack([(codes >> (2 * j)) & 3 for j in range(4)], dim=-1).flatten(-2)


def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of :func:`unpack`: [..., n] codes below 2^width -> [..., n * width / 8] uint8."""
    per = 8 // width
    if codes.shape[-1] % per:
        raise ValueError(f"a {width}-bit class needs a multiple of {per} channels, got {codes.shape[-1]}")
    out = codes[..., 0::per].clone()
    for j in range(1, per):
        out |= codes[..., j::per] << (width * j)
    return out


def dequantize(store: dict, widths) -> torch.Tensor:
    """The stored channels [B, H, T, kept(widths)] in float32."""
    parts = []
    for width, n in widths:
        if not n:
            continue
        key = str(width)
        if width == 16:
            parts.append(store[key].float())
            continue
        codes = unpack(store[key], width)
        s, z = store[key + ".s"].float(), store[key + ".z"].float()
        if s.dim() == codes.dim():  # per channel and block: each row serves BLOCK tokens
            t = codes.shape[-2]
            s, z = (x.repeat_interleave(BLOCK, dim=-2)[..., :t, :] for x in (s, z))
        else:
            s, z = s[..., None], z[..., None]
        parts.append(codes[..., :n].float() * s + z)
    return torch.cat(parts, dim=-1)


def scores_on_codes(q: torch.Tensor, k_store: dict, k_widths, bits: int) -> torch.Tensor:
    """The scores [B, H, R, T] with the query rounded to ``bits``-bit fixed point on the quantized classes, as
    a kernel that takes integer dot products computes them. ``q' = q * s`` on the classes with a scale per channel and
    block (one integer dot over all of them: ``q'`` rounded per block of :data:`BLOCK` tokens to multiples of
    ``max |q'| / (2^(bits-1) - 1)``, the max over all their channels) and ``q' = q`` on a class with a scale per token
    (rounded on its own, once); the score is ``q'' . code + q . z`` per channel, ``s[t] q'' . code + z[t] sum(q)`` per
    token. 16-bit classes are scored in float."""
    top = 2 ** (bits - 1) - 1

    def rounded(x, peak):
        step = peak / top
        return torch.where(step > 0, (x / step.clamp_min(torch.finfo(torch.float32).tiny)).round() * step, 0.0)

    total, off, per_channel = 0.0, 0, []
    for width, n in k_widths:
        if not n:
            continue
        qc = q[..., off : off + n].float()  # [B, H, R, n]
        off += n
        key = str(width)
        if width == 16:
            total = total + qc @ k_store[key].float().transpose(-1, -2)
            continue
        codes = unpack(k_store[key], width)[..., :n].float()  # [B, H, T, n]
        s, z = k_store[key + ".s"].float(), k_store[key + ".z"].float()
        if s.dim() == codes.dim():  # per channel and block [B, H, nb, n]: rounded jointly, below
            per_channel.append((qc, codes, s, z))
        else:  # per token [B, H, T]
            dot = rounded(qc, qc.abs().amax(-1, keepdim=True)) @ codes.transpose(-1, -2)
            total = total + dot * s[:, :, None, :] + qc.sum(-1, keepdim=True) * z[:, :, None, :]
    if per_channel:
        qs = [qc[:, :, :, None, :] * s[:, :, None] for qc, _, s, _ in per_channel]  # [B, H, R, nb, n]
        peak = torch.cat(qs, dim=-1).abs().amax(-1, keepdim=True)
        for x, (qc, codes, s, z) in zip(qs, per_channel):
            t, nb = codes.shape[-2], s.shape[-2]
            blocks = torch.nn.functional.pad(codes, (0, 0, 0, nb * BLOCK - t)).unflatten(-2, (nb, BLOCK))
            dot = torch.einsum("bhrjn,bhjtn->bhrjt", rounded(x, peak), blocks).flatten(-2)[..., :t]
            bias = torch.einsum("bhrn,bhjn->bhrj", qc, z).repeat_interleave(BLOCK, dim=-1)[..., :t]
            total = total + dot + bias
    return total


def _weighted_values(p: torch.Tensor, v_store: dict, v_widths, bits: int) -> torch.Tensor:
    """``p @ values`` [B, H, R, n_v] with the weights of each quantized class, ``w = p * s[t]``, rounded to multiples of
    ``max w / (2^(bits-1) - 1)`` per block of :data:`BLOCK` tokens (the max over the block), as a kernel summing
    integer codes with fixed-point weights computes it: ``sum_t w''[t] code[t] + sum_t p[t] z[t]``."""
    top = 2 ** (bits - 1) - 1
    parts = []
    for width, n in v_widths:
        if not n:
            continue
        key = str(width)
        if width == 16:
            parts.append(p @ v_store[key].float())
            continue
        codes = unpack(v_store[key], width)[..., :n].float()  # [B, H, T, n]
        s, z = v_store[key + ".s"].float()[:, :, None, :], v_store[key + ".z"].float()[:, :, None, :]
        t = codes.shape[-2]
        w = torch.nn.functional.pad(p * s, (0, -t % BLOCK)).unflatten(-1, (-1, BLOCK))  # [B, H, R, nb, BLOCK]
        step = w.amax(-1, keepdim=True) / top
        w = torch.where(step > 0, (w / step.clamp_min(torch.finfo(torch.float32).tiny)).round() * step, 0.0)
        parts.append(w.flatten(-2)[..., :t] @ codes + (p * z).sum(-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def attend(q: torch.Tensor, k_store: dict, v_store: dict, k_widths, v_widths,
           mask: torch.Tensor | None = None, fixed_point: int = 0,
           fixed_point_values: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, R, n_v], lse [B, H, R]) over the stored tokens (see the module docstring). ``fixed_point`` > 0:
    the quantized classes read as integers, as a kernel with integer dot products does (the C++ kernel with
    AVX512-VNNI or AVX2: ``cpu.load().fixed_point()``): the query rounded to that many bits on the keys
    (:func:`scores_on_codes`), and the softmax weights on the values (:func:`_weighted_values`) to
    ``fixed_point_values`` bits (None: the same; 0: float, as the AVX2 kernel: ``cpu.load().fixed_point_values()``)."""
    if fixed_point_values is None:
        fixed_point_values = fixed_point
    if fixed_point:
        scores = scores_on_codes(q, k_store, k_widths, fixed_point)
    else:
        keys = dequantize(k_store, k_widths)
        scores = q[..., : keys.shape[-1]].float() @ keys.transpose(-1, -2)  # [B, H, R, T]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float32).min))
    p = torch.nan_to_num(p, nan=0.0)
    if fixed_point_values:
        return _weighted_values(p, v_store, v_widths, fixed_point_values), lse
    return p @ dequantize(v_store, v_widths), lse


def quantize_class(x: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """x [..., n] float -> the stored tensors of one class of ``width`` 8 or 4 (one scale and zero per row).

    Scale rounded up and zero down to float16, so every value stays inside the code range."""

    levels = 2**width - 1
    xf = x.float()
    zero = round_fp16(xf.amin(-1), up=False)
    scale = round_fp16((xf.amax(-1) - zero.float()) / levels, up=True)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = ((xf - zero.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    if width < 8:
        codes = pack(codes, width)
    key = str(width)
    return {key: codes.contiguous(), key + ".s": scale, key + ".z": zero}


def quantize_channels(x: torch.Tensor, width: int, skip: int = 0) -> dict[str, torch.Tensor]:
    """x [..., T, n] float -> the stored tensors of one class of ``width`` 8 or 4 with a scale and zero per channel and
    block of :data:`BLOCK` tokens ([..., ceil(T / BLOCK), n]). ``skip``: the first tokens do not count in their block's
    range (attention sinks kept exact: their codes are never read, and their outliers would coarsen the block)."""

    levels = 2**width - 1
    xf = x.float()
    t = xf.shape[-2]
    pad = -t % BLOCK
    span = torch.nn.functional.pad(xf, (0, 0, 0, pad)).unflatten(-2, (-1, BLOCK))  # [..., blocks, BLOCK, n]
    lo, hi = span.amin(-2), span.amax(-2)  # [..., blocks, n]
    # the blocks with tokens that do not count (skipped sinks, the padding of a last, partial block) again, alone
    nb = span.shape[-3]
    for b in sorted({*range(min(nb, -(-skip // BLOCK))), *([nb - 1] if pad else [])}):
        first, last = b * BLOCK, min((b + 1) * BLOCK, t)
        first = max(first, min(skip, last))
        part = xf[..., first:last, :]
        lo[..., b, :] = part.amin(-2) if last > first else 0.0
        hi[..., b, :] = part.amax(-2) if last > first else 0.0
    zero = round_fp16(lo, up=False)
    scale = round_fp16((hi - zero.float()) / levels, up=True)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = ((span - zero.float()[..., None, :]) / scale.float()[..., None, :]).round_().clamp_(0, levels)
    codes = codes.flatten(-3, -2)[..., :t, :].to(torch.uint8)
    if width < 8:
        codes = pack(codes, width)
    key = str(width)
    return {key: codes.contiguous(), key + ".s": scale.contiguous(), key + ".z": zero.contiguous()}


def attend_merged(q_basis: torch.Tensor, q_exact: torch.Tensor, mean_score: torch.Tensor, k_store: dict,
                  v_store: dict, k_widths, v_widths, mask: torch.Tensor | None, exact_k: torch.Tensor,
                  exact_v: torch.Tensor, exact_mask: torch.Tensor | None, v_dec: torch.Tensor,
                  v_mean: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor] | None = None,
                  fixed_point: int = 0, fixed_point_values: int | None = None) -> torch.Tensor:
    """out [B, H, R, d] float32: one softmax over the stored tokens and ``Te`` exact ones, in the head's space.

    Stored token t: score ``q_basis[b, h, r] . key[b, h, t] + mean_score[b, h, r]``, visible where ``mask[b, t]``
    (None: all), value ``value[b, h, t] @ v_dec[h] + v_mean[h]`` (``v_dec`` [H, n_v, d], ``v_mean`` [H, d]).
    Exact token e: score ``q_exact[b, h, r] . exact_k[b, h, e]``, visible where ``exact_mask[b, e]`` ([B, Te], or per
    row [B, R, Te]; None: all), value ``exact_v[b, h, e]`` (``exact_k``/``exact_v`` [B, H, Te, d], any float dtype).
    A row that sees nothing gets 0. ``parts``: the stored part's ``(out, lse)`` when already computed (by another
    kernel); otherwise :func:`attend` computes it (with ``fixed_point`` and ``fixed_point_values``). ``mean_score``
    may also be [B, H, R, 1]."""
    out, lse = parts if parts is not None else attend(q_basis, k_store, v_store, k_widths, v_widths, mask,
                                                      fixed_point, fixed_point_values)
    B, H, R = lse.shape
    stored = lse.float() + mean_score.float().reshape(B, H, R)  # [B, H, R]
    exact = q_exact.float() @ exact_k.float().transpose(-1, -2)  # [B, H, R, Te]
    if exact_mask is not None:
        em = exact_mask[:, None, None, :] if exact_mask.dim() == 2 else exact_mask[:, None]
        exact = exact.masked_fill(~em, float("-inf"))
    scores = torch.cat([stored[..., None], exact], dim=-1)
    top = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - top.clamp_min(torch.finfo(torch.float32).min))
    p = torch.nan_to_num(p, nan=0.0)
    total = p.sum(-1, keepdim=True)
    p = torch.where(total > 0, p / total.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(p))
    head = out.float() @ v_dec.float() + v_mean.float().reshape(H, 1, -1)  # [B, H, R, d]
    return head * p[..., :1] + p[..., 1:] @ exact_v.float()
