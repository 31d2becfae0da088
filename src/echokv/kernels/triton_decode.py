"""Decode attention over per-head coded K/V in Triton (the GPU path): the same (out, lse) as
:func:`echokv.kernels.reference.attend`, flash-decoding style, without dequantizing the store in memory.

Stage 1 (:func:`_split_kernel`), grid (split, KV head, sequence): each program walks its token range in blocks of
``BLOCK_N``, loads each class's codes and widens them in registers (0..255 is exact in float16), and scores the R query
rows, padded to 16 for ``tl.dot``::

    s = sum_class ks * (q_class . codes) + kz * sum(q_class)        (ks, kz: the token's scale and zero)

then keeps an online softmax and the value sums ``acc += dot(p * vs, codes_v)``, ``zacc += sum(p * vz)``. It writes
its normalized part and the part's log-sum-exp. Stage 2 (:func:`_merge_kernel`) merges the splits by log-sum-exp, so
an empty split (-inf) drops out exactly and a row with no visible token ends with out 0, lse -inf.

Precision: the codes multiply on tensor cores in float16 (exact for 0..255). The fp32 side of each product (q, or
p * vs) is scaled into [-1, 1] (no fp16 overflow or underflow) and, with ``precise=True`` (the default), cut into two
float16 terms whose sum is the fp32 value to ~2^-22, so the result matches the float32 reference to ~1e-6 relative.
The 16-bit class is widened to fp32 (bf16 and fp16 are exact in tf32) and multiplied in tf32, its fp32 factor cut
into a tf32 head and the rest. ``precise=False`` keeps one term (the rounding of a bf16/fp16 SDPA): half the
multiplies.

Importing this module needs ``triton``; it raises ImportError otherwise (the dispatcher falls back). With
``TRITON_INTERPRET=1`` set before Triton is first imported in the process, the kernels run on CPU tensors (slowly).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the dispatcher imports lazily and falls back to the reference
    raise ImportError(
        "echokv.kernels.triton_decode needs the 'triton' package (pip install triton); "
        "use echokv.kernels.reference.attend without it"
    ) from error

from . import TRITON_WIDTHS as WIDTHS  # the class widths this kernel reads (2-bit: C++ and PyTorch paths)
from .reference import BLOCK

BLOCK_N = 64  # tokens per block: 64 codes per channel row keeps a d=128 block in registers
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def interpreting() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter."""
    return not isinstance(_merge_kernel, triton.runtime.JITFunction)


def available() -> tuple[bool, str]:
    """(whether :func:`attend` can run here, why not): it needs a CUDA device, or the interpreter."""
    if interpreting() or torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device (the Triton kernel runs on CUDA tensors; TRITON_INTERPRET=1 runs it on CPU)"


@triton.jit
def _dotn(a, b, TERMS: tl.constexpr):
    """dot(a, b) in fp32 for fp32 ``a`` in [-1, 1] and float16 ``b``: ``a`` is cut into TERMS (1 or 2) fp16 parts."""
    head = a.to(b.dtype)
    out = tl.dot(head, b)
    if TERMS > 1:
        out += tl.dot((a - head.to(tl.float32)).to(b.dtype), b)
    return out


@triton.jit
def _dot32(a, b, TERMS: tl.constexpr):
    """dot(a, b) in fp32 on tf32 tensor cores, for ``b`` exact in tf32 (bf16/fp16 values widened to fp32): ``a`` is
    cut into its tf32 head (10 mantissa bits) and the rest (TERMS = 2), which tf32x3 would do for ``b`` too."""
    if TERMS > 1:
        head = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 13 low mantissa bits cleared
        return tl.dot(head, b, input_precision="tf32") + tl.dot(a - head, b, input_precision="tf32")
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _unit(x, axis: tl.constexpr):
    """max |x| along ``axis``, 1 where it is 0: the factor that brings x into [-1, 1] (fp16 range, no underflow)."""
    m = tl.max(tl.abs(x), axis=axis)
    return tl.where(m == 0.0, 1.0, m)


@triton.jit
def _split_kernel(
    Q, sq_b, sq_h, sq_r, sq_c,
    MASK, sm_b, sm_t,
    K16, sk16_b, sk16_h, sk16_t,
    K8, sk8_b, sk8_h, sk8_t, K8S, sk8s_b, sk8s_h, sk8s_t, K8Z, sk8z_b, sk8z_h, sk8z_t,
    K4, sk4_b, sk4_h, sk4_t, K4S, sk4s_b, sk4s_h, sk4s_t, K4Z, sk4z_b, sk4z_h, sk4z_t,
    V16, sv16_b, sv16_h, sv16_t,
    V8, sv8_b, sv8_h, sv8_t, V8S, sv8s_b, sv8s_h, sv8s_t, V8Z, sv8z_b, sv8z_h, sv8z_t,
    V4, sv4_b, sv4_h, sv4_t, V4S, sv4s_b, sv4s_h, sv4s_t, V4Z, sv4z_b, sv4z_h, sv4z_t,
    PO, spo_b, spo_h, spo_s, spo_r,
    PL, spl_b, spl_h, spl_s,
    T, R, TOKENS_PER_SPLIT,
    NK16: tl.constexpr, NK8: tl.constexpr, NK4: tl.constexpr,
    OK16: tl.constexpr, OK8: tl.constexpr, OK4: tl.constexpr,
    PK16: tl.constexpr, PK8: tl.constexpr, PK4: tl.constexpr,
    NV16: tl.constexpr, NV8: tl.constexpr, NV4: tl.constexpr,
    OV16: tl.constexpr, OV8: tl.constexpr, OV4: tl.constexpr,
    PV16: tl.constexpr, PV8: tl.constexpr, PV4: tl.constexpr,
    TC: tl.constexpr, KC8: tl.constexpr, KC4: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (split, KV head, sequence): the normalized partial output and log-sum-exp of its token range.

    NK*/NV*: channels of the key/value classes of width 16, 8, 4 (0: absent); OK*/OV*: their first channel in q / out;
    PK*/PV*: their padded register width (for width 4, of one nibble half); TC: the terms each fp32 factor is cut
    into (2 precise, 1 fast); KC8/KC4: the key class has a scale and zero per channel and block (row ``start //
    BLOCK_N``), not per token: they multiply the query instead of the dot."""
    split = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # 64-bit offsets: a cache buffer may pass 2^31 elements
    b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < R
    tok_lo = split * TOKENS_PER_SPLIT
    tok_hi = tl.minimum(tok_lo + TOKENS_PER_SPLIT, T)
    q_base = Q + b * sq_b + h * sq_h + rows[:, None] * sq_r

    # The query of each key class, scaled into [-1, 1] once per program (its factor multiplies the scores back).
    if NK16 > 0:
        c16 = tl.arange(0, PK16)
        q16 = tl.load(q_base + (OK16 + c16[None, :]) * sq_c, mask=row_ok[:, None] & (c16[None, :] < NK16),
                      other=0.0).to(tl.float32)
    if NK8 > 0:
        c8 = tl.arange(0, PK8)
        q8 = tl.load(q_base + (OK8 + c8[None, :]) * sq_c, mask=row_ok[:, None] & (c8[None, :] < NK8),
                     other=0.0).to(tl.float32)
        sum8 = tl.sum(q8, axis=1)
        u8 = _unit(q8, 1)
        q8 = q8 / u8[:, None]
    if NK4 > 0:
        c4 = tl.arange(0, PK4)  # byte j holds channels 2j (low nibble) and 2j + 1 (high nibble)
        q4e = tl.load(q_base + (OK4 + 2 * c4[None, :]) * sq_c, mask=row_ok[:, None] & (2 * c4[None, :] < NK4),
                      other=0.0).to(tl.float32)
        q4o = tl.load(q_base + (OK4 + 2 * c4[None, :] + 1) * sq_c,
                      mask=row_ok[:, None] & (2 * c4[None, :] + 1 < NK4), other=0.0).to(tl.float32)
        sum4 = tl.sum(q4e, axis=1) + tl.sum(q4o, axis=1)
        u4 = tl.maximum(_unit(q4e, 1), _unit(q4o, 1))
        q4e = q4e / u4[:, None]
        q4o = q4o / u4[:, None]

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    if NV16 > 0:
        d16 = tl.arange(0, PV16)
        acc16 = tl.zeros([BLOCK_R, PV16], tl.float32)
    if NV8 > 0:
        d8 = tl.arange(0, PV8)
        acc8 = tl.zeros([BLOCK_R, PV8], tl.float32)
        z8 = tl.zeros([BLOCK_R], tl.float32)
    if NV4 > 0:
        d4 = tl.arange(0, PV4)
        acc4e = tl.zeros([BLOCK_R, PV4], tl.float32)
        acc4o = tl.zeros([BLOCK_R, PV4], tl.float32)
        z4 = tl.zeros([BLOCK_R], tl.float32)

    for start in range(tok_lo, tok_hi, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)
        ok = tok < tok_hi
        if HAS_MASK:
            # masked tokens are never read, so padding may hold anything (even NaN)
            ok = ok & (tl.load(MASK + b * sm_b + tok * sm_t, mask=ok, other=0) != 0)

        s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        if NK16 > 0:
            k = tl.load(K16 + b * sk16_b + h * sk16_h + tok[:, None] * sk16_t + c16[None, :],
                        mask=ok[:, None] & (c16[None, :] < NK16), other=0.0).to(tl.float32)
            s += _dot32(q16, tl.trans(k), TC)
        if NK8 > 0:
            k = tl.load(K8 + b * sk8_b + h * sk8_h + tok[:, None] * sk8_t + c8[None, :],
                        mask=ok[:, None] & (c8[None, :] < NK8), other=0).to(tl.float16)
            if KC8:
                row = start // BLOCK_N
                ks = tl.load(K8S + b * sk8s_b + h * sk8s_h + row * sk8s_t + c8, mask=c8 < NK8, other=0.0)
                kz = tl.load(K8Z + b * sk8z_b + h * sk8z_h + row * sk8z_t + c8, mask=c8 < NK8, other=0.0)
                qs = q8 * u8[:, None] * ks.to(tl.float32)[None, :]
                us = _unit(qs, 1)
                s += _dotn(qs / us[:, None], tl.trans(k), TC) * us[:, None] + tl.sum(
                    q8 * u8[:, None] * kz.to(tl.float32)[None, :], axis=1)[:, None]
            else:
                ks = tl.load(K8S + b * sk8s_b + h * sk8s_h + tok * sk8s_t, mask=ok, other=0.0).to(tl.float32)
                kz = tl.load(K8Z + b * sk8z_b + h * sk8z_h + tok * sk8z_t, mask=ok, other=0.0).to(tl.float32)
                s += (_dotn(q8, tl.trans(k), TC) * u8[:, None]) * ks[None, :] + sum8[:, None] * kz[None, :]
        if NK4 > 0:
            k = tl.load(K4 + b * sk4_b + h * sk4_h + tok[:, None] * sk4_t + c4[None, :],
                        mask=ok[:, None] & (2 * c4[None, :] < NK4), other=0)
            lo = (k & 15).to(tl.float16)
            hi = (k >> 4).to(tl.float16)
            if KC4:
                row = start // BLOCK_N
                ce, co = 2 * c4, 2 * c4 + 1
                kse = tl.load(K4S + b * sk4s_b + h * sk4s_h + row * sk4s_t + ce, mask=ce < NK4, other=0.0)
                kso = tl.load(K4S + b * sk4s_b + h * sk4s_h + row * sk4s_t + co, mask=co < NK4, other=0.0)
                kze = tl.load(K4Z + b * sk4z_b + h * sk4z_h + row * sk4z_t + ce, mask=ce < NK4, other=0.0)
                kzo = tl.load(K4Z + b * sk4z_b + h * sk4z_h + row * sk4z_t + co, mask=co < NK4, other=0.0)
                qe = q4e * u4[:, None] * kse.to(tl.float32)[None, :]
                qo = q4o * u4[:, None] * kso.to(tl.float32)[None, :]
                us = tl.maximum(_unit(qe, 1), _unit(qo, 1))
                dots = _dotn(qe / us[:, None], tl.trans(lo), TC) + _dotn(qo / us[:, None], tl.trans(hi), TC)
                zs = tl.sum(q4e * kze.to(tl.float32)[None, :] + q4o * kzo.to(tl.float32)[None, :], axis=1) * u4
                s += dots * us[:, None] + zs[:, None]
            else:
                ks = tl.load(K4S + b * sk4s_b + h * sk4s_h + tok * sk4s_t, mask=ok, other=0.0).to(tl.float32)
                kz = tl.load(K4Z + b * sk4z_b + h * sk4z_h + tok * sk4z_t, mask=ok, other=0.0).to(tl.float32)
                dots = _dotn(q4e, tl.trans(lo), TC) + _dotn(q4o, tl.trans(hi), TC)
                s += (dots * u4[:, None]) * ks[None, :] + sum4[:, None] * kz[None, :]
        s = tl.where(ok[None, :], s, float("-inf"))

        # online softmax; a row that has seen no visible token keeps m = -inf, so shift by 0 there (no NaN)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        if NV16 > 0:
            v = tl.load(V16 + b * sv16_b + h * sv16_h + tok[:, None] * sv16_t + d16[None, :],
                        mask=ok[:, None] & (d16[None, :] < NV16), other=0.0).to(tl.float32)
            acc16 = acc16 * alpha[:, None] + _dot32(p, v, TC)
        if NV8 > 0:
            v = tl.load(V8 + b * sv8_b + h * sv8_h + tok[:, None] * sv8_t + d8[None, :],
                        mask=ok[:, None] & (d8[None, :] < NV8), other=0).to(tl.float16)
            vs = tl.load(V8S + b * sv8s_b + h * sv8s_h + tok * sv8s_t, mask=ok, other=0.0).to(tl.float32)
            vz = tl.load(V8Z + b * sv8z_b + h * sv8z_h + tok * sv8z_t, mask=ok, other=0.0).to(tl.float32)
            # p * vs scaled by the block's largest scale, so it stays in [0, 1] in fp16
            us = _unit(vs, 0)
            acc8 = acc8 * alpha[:, None] + _dotn(p * (vs / us)[None, :], v, TC) * us
            z8 = z8 * alpha + tl.sum(p * vz[None, :], axis=1)
        if NV4 > 0:
            v = tl.load(V4 + b * sv4_b + h * sv4_h + tok[:, None] * sv4_t + d4[None, :],
                        mask=ok[:, None] & (2 * d4[None, :] < NV4), other=0)
            vs = tl.load(V4S + b * sv4s_b + h * sv4s_h + tok * sv4s_t, mask=ok, other=0.0).to(tl.float32)
            vz = tl.load(V4Z + b * sv4z_b + h * sv4z_h + tok * sv4z_t, mask=ok, other=0.0).to(tl.float32)
            us = _unit(vs, 0)
            w = p * (vs / us)[None, :]
            acc4e = acc4e * alpha[:, None] + _dotn(w, (v & 15).to(tl.float16), TC) * us
            acc4o = acc4o * alpha[:, None] + _dotn(w, (v >> 4).to(tl.float16), TC) * us
            z4 = z4 * alpha + tl.sum(p * vz[None, :], axis=1)

    # normalized part and its lse; an empty part (l = 0) writes out 0, lse -inf
    seen = l_i > 0.0
    safe = tl.where(seen, l_i, 1.0)  # no 1/0 or log(0), even in the branch tl.where drops
    inv = tl.where(seen, 1.0 / safe, 0.0)
    lse = tl.where(seen, m_i + tl.log(safe), float("-inf"))
    tl.store(PL + b * spl_b + h * spl_h + split * spl_s + rows, lse, mask=row_ok)
    o_base = PO + b * spo_b + h * spo_h + split * spo_s + rows[:, None] * spo_r
    if NV16 > 0:
        tl.store(o_base + OV16 + d16[None, :], acc16 * inv[:, None], mask=row_ok[:, None] & (d16[None, :] < NV16))
    if NV8 > 0:
        tl.store(o_base + OV8 + d8[None, :], (acc8 + z8[:, None]) * inv[:, None],
                 mask=row_ok[:, None] & (d8[None, :] < NV8))
    if NV4 > 0:
        tl.store(o_base + OV4 + 2 * d4[None, :], (acc4e + z4[:, None]) * inv[:, None],
                 mask=row_ok[:, None] & (2 * d4[None, :] < NV4))
        tl.store(o_base + OV4 + 2 * d4[None, :] + 1, (acc4o + z4[:, None]) * inv[:, None],
                 mask=row_ok[:, None] & (2 * d4[None, :] + 1 < NV4))


@triton.jit
def _merge_kernel(
    PO, spo_b, spo_h, spo_s, spo_r,
    PL, spl_b, spl_h, spl_s,
    O, so_b, so_h, so_r,
    L, sl_b, sl_h,
    SPLITS, NV: tl.constexpr, PV: tl.constexpr, PS: tl.constexpr,
):
    """One (query row, KV head, sequence): the splits' parts merged by log-sum-exp (PS: SPLITS padded)."""
    r = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, PS)
    lses = tl.load(PL + b * spl_b + h * spl_h + i * spl_s + r, mask=i < SPLITS, other=float("-inf"))
    top = tl.max(lses, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)  # all parts empty: every weight is exp(-inf) = 0
    total = tl.sum(tl.exp(lses - shift), axis=0)
    d = tl.arange(0, PV)
    acc = tl.zeros([PV], tl.float32)
    for split in range(SPLITS):
        w = tl.exp(tl.load(PL + b * spl_b + h * spl_h + split * spl_s + r) - shift)
        acc += w * tl.load(PO + b * spo_b + h * spo_h + split * spo_s + r * spo_r + d, mask=d < NV, other=0.0)
    seen = total > 0.0
    safe = tl.where(seen, total, 1.0)  # no 1/0 or log(0), even in the branch tl.where drops
    tl.store(O + b * so_b + h * so_h + r * so_r + d, acc * tl.where(seen, 1.0 / safe, 0.0), mask=d < NV)
    tl.store(L + b * sl_b + h * sl_h + r, tl.where(seen, shift + tl.log(safe), float("-inf")))


def _pad(n: int) -> int:
    """Register width for n channels: a power of two, at least 16 (tl.dot), 0 for an absent class."""
    return max(MIN_DOT, triton.next_power_of_2(n)) if n else 0


def _layout(store: dict, widths, q: torch.Tensor) -> tuple[list, dict, int | None]:
    """(the kernel's pointer/stride arguments, its class constexprs, T) of one store: codes, scale, zero per class."""
    classes, offset = {}, 0
    for width, n in widths:
        if width not in WIDTHS:
            raise ValueError(f"class width {width} is not one the Triton kernel reads ({WIDTHS}); run the PyTorch "
                             f"path (kernel='torch')")
        if width in classes:
            raise ValueError(f"class width {width} appears twice in {widths}")
        if n:
            classes[width] = (n, offset)
        offset += n
    args, meta, tokens = [], {}, None
    for width in WIDTHS:
        n, first = classes.get(width, (0, 0))
        names = [str(width)] if width == 16 else [str(width), f"{width}.s", f"{width}.z"]
        chan = bool(n) and width != 16 and store[f"{width}.s"].dim() == 4  # per channel and block of tokens
        for name in names:
            if n:
                t = store[name]
                if (name == str(width) or chan) and t.stride(-1) != 1:
                    raise ValueError(f"store[{name!r}] must be contiguous in its last dimension")
                if name == str(width):
                    tokens = t.shape[2]
                args += [t, t.stride(0), t.stride(1), t.stride(2)]
            else:
                args += [q, 0, 0, 0]  # never read (the class's constexpr count is 0)
        half = (n + 1) // 2 if width == 4 else n  # a 4-bit class is read as its two nibble halves
        meta[width] = (n, first, _pad(half), chan)
    return args, meta, tokens


def _splits(batch: int, heads: int, blocks: int, device: torch.device) -> int:
    """Splits per (sequence, head): about 2 programs per SM, each at least 2 blocks long."""
    if device.type != "cuda":
        return min(blocks, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(blocks, 2), triton.cdiv(2 * sms, batch * heads)))


def attend(q: torch.Tensor, k_store: dict, v_store: dict, k_widths, v_widths,
           mask: torch.Tensor | None = None, *, num_splits: int | None = None, block_n: int = BLOCK_N,
           precise: bool = True, num_warps: int = 4, num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, R, n_v], lse [B, H, R]) float32, as :func:`echokv.kernels.reference.attend`.

    The stored tensors are read in place through their strides (last dimension contiguous). ``num_splits`` (the
    token splits per sequence and head, default: enough programs for the device), ``block_n`` (tokens per block, a
    power of two >= 16), ``precise`` and ``num_warps`` tune the kernel, not the result."""
    if not interpreting() and q.device.type != "cuda":
        raise RuntimeError("the Triton kernel runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set at import)")
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_DOT}, got {block_n}")
    batch, heads, rows, _ = q.shape
    k_args, k_meta, k_tokens = _layout(k_store, k_widths, q)
    v_args, v_meta, v_tokens = _layout(v_store, v_widths, q)
    tokens = k_tokens if k_tokens is not None else v_tokens
    if tokens is None:
        tokens = mask.shape[1] if mask is not None else 0
    n_v = sum(m[0] for m in v_meta.values())
    if any(m[3] for m in v_meta.values()):
        raise ValueError("value classes have a scale per token (per channel and block only for keys)")
    if any(m[3] for m in k_meta.values()) and block_n != BLOCK:
        raise ValueError(f"per-channel key scales serve blocks of {BLOCK} tokens: block_n must be {BLOCK}")
    out = torch.zeros(batch, heads, rows, n_v, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, rows), float("-inf"), dtype=torch.float32, device=q.device)
    if tokens == 0 or batch * heads * rows == 0:
        return out, lse

    blocks = triton.cdiv(tokens, block_n)
    splits = num_splits or _splits(batch, heads, blocks, q.device)
    per_split = triton.cdiv(blocks, splits) * block_n  # a whole number of blocks; trailing splits may be empty
    part_out = torch.empty(batch, heads, splits, rows, max(n_v, 1), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, heads, splits, rows, dtype=torch.float32, device=q.device)
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes, no copy
        mask_args = [mask, mask.stride(0), mask.stride(1)]
    else:
        mask_args = [q, 0, 0]

    constexprs = {}
    for kind, meta in (("K", k_meta), ("V", v_meta)):
        for width in WIDTHS:
            n, first, padded, chan = meta[width]
            constexprs[f"N{kind}{width}"], constexprs[f"O{kind}{width}"] = n, first
            constexprs[f"P{kind}{width}"] = padded
            if kind == "K" and width != 16:
                constexprs[f"KC{width}"] = chan
    _split_kernel[(splits, heads, batch)](
        q, *q.stride(), *mask_args, *k_args, *v_args,
        part_out, *part_out.stride()[:4], part_lse, *part_lse.stride()[:3],
        tokens, rows, per_split, **constexprs,
        TC=2 if precise else 1, HAS_MASK=mask is not None,
        BLOCK_R=max(MIN_DOT, triton.next_power_of_2(rows)), BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )
    _merge_kernel[(rows, heads, batch)](
        part_out, *part_out.stride()[:4], part_lse, *part_lse.stride()[:3],
        out, *out.stride()[:3], lse, *lse.stride()[:2],
        splits, NV=n_v, PV=max(MIN_DOT, triton.next_power_of_2(max(n_v, 1))), PS=triton.next_power_of_2(splits),
        num_warps=1,
    )
    return out, lse


__all__ = ["BLOCK_N", "attend", "available", "interpreting"]
