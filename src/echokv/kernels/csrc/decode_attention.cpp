// Fused decode attention over per-head coded K/V (the layout and semantics of echokv/kernels/reference.py).
//
// Work items are (sequence, KV head, token split), run by at::parallel_for; each item walks its tokens in blocks
// of 64 with an online softmax, and the splits are merged by log-sum-exp at the end. Per block:
//   keys:   16-bit classes (and, without VNNI or AVX2, every class) are widened to float into one L1 scratch row per
//           token, each query row's dots taken over 16 (AVX2: 8) tokens at a time and reduced by one transpose-add
//           tree; with AVX512-VNNI or AVX2, the quantized classes are widened to int16 into a second row (all
//           per-channel classes side by side) and scored with the query rounded to 16-bit fixed point, 32 products
//           per vpdpwssd (AVX2: 16 per vpmaddwd + vpaddd);
//   values: quantized classes (VNNI, AVX2): the weights p_t * s_t rounded to 16-bit fixed point per block and row,
//           token pairs laid out as int16 pairs by vpermt2b (AVX2: vpunpcklbw), one vpdpwssd per row and 16 channels
//           (AVX2: vpmaddwd + vpaddd per 8), exact int32 per block;
//           otherwise acc += (p_t * s_t) * codes_t in float, the codes widened in registers, the accumulators blocked
//           over (up to 4 rows) x (up to 64 channels); zero points: zacc += p_t * z_t.
// The fixed-point rounding (a step of 2^-15 of the row's largest |q * s| or weight of the block) is part of the
// specification: reference.attend(fixed_point=16) computes it, and the kernel agrees with it to 1e-4; the float
// paths agree with reference.attend() to 1e-4. The AVX-512 paths are compiled where the target has them
// (-march=native); without AVX-512, AVX2 + FMA + F16C run 16-bit classes in float on 8 lanes and quantized ones as
// integers (the VNNI specification); otherwise a plain C++ path runs the same driver (older x86, ARM), in float.
// 4-bit codes of the float value path are used in the order they unpack (per 16 stored bytes: the even channels,
// then the odd ones), with the query permuted to match and the output permuted back.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ECHOKV_AVX512 1
#include <immintrin.h>
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
// Quantized classes are read as integers: keys scored with the query in 16-bit fixed point, values summed with the
// weights in 16-bit fixed point, vpdpwssd products (vpermt2b pairs the tokens of the values).
#define ECHOKV_VNNI 1
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// 8 float lanes, every class widened in registers (AMD Zen 1-3, Intel client CPUs without AVX-512); quantized
// classes read as integers as with VNNI (vpmaddwd for vpdpwssd)
#define ECHOKV_AVX2 1
#include <immintrin.h>
#endif
// (-DECHOKV_FLOAT_KEYS / -DECHOKV_FLOAT_VALUES keep the AVX2 build on the float paths: for A/B timings)
#if defined(ECHOKV_VNNI) || (defined(ECHOKV_AVX2) && !defined(ECHOKV_FLOAT_KEYS))
#define ECHOKV_INT_KEYS 1  // quantized key classes scored on their codes with a 16-bit fixed-point query
#endif
#if defined(ECHOKV_VNNI) || (defined(ECHOKV_AVX2) && !defined(ECHOKV_FLOAT_VALUES))
#define ECHOKV_INT_VALUES 1  // quantized value classes summed on their codes with 16-bit fixed-point weights
#endif

namespace {

constexpr int BT = 64;  // tokens per block: the widened key block stays in L1
#if defined(ECHOKV_AVX2)
constexpr int ROWPAD = 16;  // int16 lanes past a widened key row: AVX2's stores of a class tail take all 16 lanes
#else
constexpr int ROWPAD = 0;  // (AVX-512 masks its tails)
#endif
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Cls {
  int width = 0;     // 16, 8 or 4
  bool bf16 = true;  // width 16: bfloat16 (else float16)
  int n = 0;         // channels
  int off = 0;       // first channel in the natural order
  int npad = 0;      // values: channels in the padded (4 bit: permuted) accumulator layout, a multiple of 16
  int poff = 0;      // values: offset of the class in that layout
  const uint8_t* data = nullptr;
  int64_t db = 0, dh = 0, dt = 0;  // byte strides
  const at::Half* s = nullptr;
  const at::Half* z = nullptr;
  int64_t sb = 0, sh = 0, st = 0, zb = 0, zh = 0, zt = 0;  // element strides (per channel: st, zt step a block)
  bool chan = false;  // keys: one scale and zero per channel and block of BT tokens (KIVI), not per token
  int foff = 0;       // keys: offset in the float scratch layout (the classes not scored on their codes)
  bool ints = false;  // read as integers (VNNI, AVX2): keys scored on their codes, values summed in channel order
  int nvec = 0;       // ints: 32-lane int16 vectors of the class alone (its n lanes, zero padded)
  int loff = 0;       // ints, per channel: first of its n lanes in the row shared by the per-channel classes

  const uint8_t* tok(int64_t b, int64_t h, int64_t t) const { return data + b * db + h * dh + t * dt; }
};

// Value-accumulator position of natural channel c of a class (4 bit: per 32 channels, the even ones, then the odd).
inline int padded_index(const Cls& c, int ch) {
  if (c.width != 4) return ch;
  return (ch / 32) * 32 + (ch % 2) * 16 + (ch % 32) / 2;
}

// Key-scratch position of natural channel c within its class: the classes sit at their natural offsets with no
// padding between them (fewer chunks to dot); 4 bit: per 16 stored bytes (m of them, m < 16 only at the tail), the
// m even channels, then the m odd ones.
inline int compact_index(const Cls& c, int ch) {
  if (c.width != 4) return ch;
  const int i = ch / 2, k = i / 16, m = std::min(16, c.n / 2 - 16 * k);
  return 32 * k + (ch % 2) * m + i % 16;
}

// ---------------------------------------------------------------------------------------------------------------
// Portable primitives
// ---------------------------------------------------------------------------------------------------------------

// One token's channels of a class, widened to float in the padded layout (codes, not yet scaled).
inline void widen_token_scalar(const Cls& c, const uint8_t* p, float* out) {
  std::fill(out, out + c.npad, 0.0f);
  if (c.width == 16) {
    if (c.bf16) {
      const c10::BFloat16* x = reinterpret_cast<const c10::BFloat16*>(p);
      for (int i = 0; i < c.n; ++i) out[i] = static_cast<float>(x[i]);
    } else {
      const at::Half* x = reinterpret_cast<const at::Half*>(p);
      for (int i = 0; i < c.n; ++i) out[i] = static_cast<float>(x[i]);
    }
  } else if (c.width == 8) {
    for (int i = 0; i < c.n; ++i) out[i] = static_cast<float>(p[i]);
  } else if (c.width == 2) {
    for (int i = 0; i < c.n; ++i) out[i] = static_cast<float>((p[i / 4] >> (2 * (i % 4))) & 3);
  } else {
    for (int i = 0; i < c.n / 2; ++i) {
      const int base = (i / 16) * 32 + i % 16;
      out[base] = static_cast<float>(p[i] & 15);
      out[base + 16] = static_cast<float>(p[i] >> 4);
    }
  }
}

inline float exp_scalar(float x) { return x == NEG_INF ? 0.0f : std::exp(x); }

#ifdef ECHOKV_AVX512
// ---------------------------------------------------------------------------------------------------------------
// AVX-512 primitives
// ---------------------------------------------------------------------------------------------------------------

inline __mmask16 lanes(int k) { return k >= 16 ? __mmask16(0xFFFF) : k <= 0 ? __mmask16(0) : __mmask16((1u << k) - 1); }

// Chunk j (16 channels of the padded layout) of one token, as float codes.
template <int W, bool BF16>
inline __m512 load_chunk(const uint8_t* p, int j, int n) {
  if constexpr (W == 16) {
    const __m256i x = _mm256_maskz_loadu_epi16(lanes(n - 16 * j), p + 32 * j);
    if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
    else return _mm512_cvtph_ps(x);
  } else if constexpr (W == 8) {
    const __m128i x = _mm_maskz_loadu_epi8(lanes(n - 16 * j), p + 16 * j);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x));
  } else {
    const __m128i x = _mm_maskz_loadu_epi8(lanes(n / 2 - 16 * (j >> 1)), p + 16 * (j >> 1));
    const __m512i w = _mm512_cvtepu8_epi32(x);
    const __m512i v = (j & 1) ? _mm512_srli_epi32(w, 4) : _mm512_and_si512(w, _mm512_set1_epi32(15));
    return _mm512_cvtepi32_ps(v);
  }
}

// exp(x) for x <= 0 (Cephes polynomial, ~1e-7 relative), exactly 0 for x = -inf.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}

// out[i] = sum of the 16 lanes of v[i]: a transpose-add tree, ~3 instructions per vector.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Dequantized channels (code * s_t + z_t, or the 16-bit values) of nt tokens into kbuf rows of kstride floats, in
// the compact layout (masked stores: only the class's own channels are written).
// Per channel (c.chan), sv and zv hold the block's scales and zeros in the class's compact layout instead.
template <int W, bool BF16>
void widen_block_avx(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* sv, const float* zv,
                     float* kbuf, int kstride) {
  const bool quant = W != 16;
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    float* o = kbuf + t * kstride;
    const __m512 s = _mm512_set1_ps(quant && !c.chan ? sv[t] : 1.0f), z = _mm512_set1_ps(quant && !c.chan ? zv[t] : 0.0f);
    if constexpr (W == 4) {
      const int nb = c.n / 2;
      for (int k = 0; 16 * k < nb; ++k) {
        const int m = std::min(16, nb - 16 * k);
        const __m512i w = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes(m), p + 16 * k));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
        if (c.chan) {
          const int a = 32 * k, e = 32 * k + m;
          _mm512_mask_storeu_ps(o + a, lanes(m), _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(lanes(m), sv + a),
                                                                   _mm512_maskz_loadu_ps(lanes(m), zv + a)));
          _mm512_mask_storeu_ps(o + e, lanes(m), _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(lanes(m), sv + e),
                                                                   _mm512_maskz_loadu_ps(lanes(m), zv + e)));
        } else {
          _mm512_mask_storeu_ps(o + 32 * k, lanes(m), _mm512_fmadd_ps(lo, s, z));
          _mm512_mask_storeu_ps(o + 32 * k + m, lanes(m), _mm512_fmadd_ps(hi, s, z));
        }
      }
    } else {
      for (int j = 0; 16 * j < c.n; ++j) {
        const __m512 x = load_chunk<W, BF16>(p, j, c.n);
        const __mmask16 k = lanes(c.n - 16 * j);
        if (quant && c.chan)
          _mm512_mask_storeu_ps(o + 16 * j, k, _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, sv + 16 * j),
                                                               _mm512_maskz_loadu_ps(k, zv + 16 * j)));
        else
          _mm512_mask_storeu_ps(o + 16 * j, k, quant ? _mm512_fmadd_ps(x, s, z) : x);
      }
    }
  }
}

// dots[t] = q . kbuf[t] for t < nt (kbuf rows past nt are read but their results dropped).
template <int NCH>
void dots_avx_n(const float* kbuf, int npad, const float* q, int nt, float* dots) {  // npad: the row stride
  __m512 qv[NCH];
  for (int j = 0; j < NCH; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j);
  for (int t0 = 0; t0 < nt; t0 += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) {
      const float* k = kbuf + (t0 + i) * npad;
      __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
      for (int j = 1; j < NCH; ++j) a = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(k + 16 * j), a);
      acc[i] = a;
    }
    _mm512_mask_storeu_ps(dots + t0, lanes(nt - t0), hsum16(acc));
  }
}

void dots_avx_any(const float* kbuf, int npad, const float* q, int nt, float* dots) {
  const int nch = npad / 16;
  for (int t0 = 0; t0 < nt; t0 += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) {
      const float* k = kbuf + (t0 + i) * npad;
      __m512 a = _mm512_setzero_ps();
      for (int j = 0; j < nch; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * j), _mm512_loadu_ps(k + 16 * j), a);
      acc[i] = a;
    }
    _mm512_mask_storeu_ps(dots + t0, lanes(nt - t0), hsum16(acc));
  }
}

void dots_avx(const float* kbuf, int npad, const float* q, int nt, float* dots) {
  switch (npad / 16) {
    case 1: return dots_avx_n<1>(kbuf, npad, q, nt, dots);
    case 2: return dots_avx_n<2>(kbuf, npad, q, nt, dots);
    case 3: return dots_avx_n<3>(kbuf, npad, q, nt, dots);
    case 4: return dots_avx_n<4>(kbuf, npad, q, nt, dots);
    case 6: return dots_avx_n<6>(kbuf, npad, q, nt, dots);
    case 8: return dots_avx_n<8>(kbuf, npad, q, nt, dots);
    default: return dots_avx_any(kbuf, npad, q, nt, dots);
  }
}

// acc[r][16 j0 .. 16 (j0 + NC)) += sum_t w[r][t] * codes_t, rows r0 .. r0 + NR, codes widened in registers.
template <int W, bool BF16, int NR, int NC>
void vacc_tile(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* w, float* acc, int accstride,
               int r0, int j0) {
  __m512 a[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NC; ++k) a[r][k] = _mm512_loadu_ps(acc + (r0 + r) * accstride + 16 * (j0 + k));
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    __m512 x[NC];
    for (int k = 0; k < NC; ++k) x[k] = load_chunk<W, BF16>(p, j0 + k, c.n);
    for (int r = 0; r < NR; ++r) {
      const __m512 wr = _mm512_set1_ps(w[(r0 + r) * BT + t]);
      for (int k = 0; k < NC; ++k) a[r][k] = _mm512_fmadd_ps(wr, x[k], a[r][k]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NC; ++k) _mm512_storeu_ps(acc + (r0 + r) * accstride + 16 * (j0 + k), a[r][k]);
}

template <int W, bool BF16, int NR>
void vacc_rows(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* w, float* acc, int accstride,
               int r0, int j0, int nc) {
  switch (nc) {
    case 1: return vacc_tile<W, BF16, NR, 1>(c, p0, dt, nt, w, acc, accstride, r0, j0);
    case 2: return vacc_tile<W, BF16, NR, 2>(c, p0, dt, nt, w, acc, accstride, r0, j0);
    case 3: return vacc_tile<W, BF16, NR, 3>(c, p0, dt, nt, w, acc, accstride, r0, j0);
    default: return vacc_tile<W, BF16, NR, 4>(c, p0, dt, nt, w, acc, accstride, r0, j0);
  }
}

template <int W, bool BF16>
void vacc_avx(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int R, const float* w, float* acc,
              int accstride) {
  const int nch = c.npad / 16;
  for (int j0 = 0; j0 < nch; j0 += 4) {
    const int nc = std::min(4, nch - j0);
    for (int r0 = 0; r0 < R; r0 += 4) {
      switch (std::min(4, R - r0)) {
        case 1: vacc_rows<W, BF16, 1>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
        case 2: vacc_rows<W, BF16, 2>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
        case 3: vacc_rows<W, BF16, 3>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
        default: vacc_rows<W, BF16, 4>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
      }
    }
  }
}
#ifdef ECHOKV_VNNI
// ---------------------------------------------------------------------------------------------------------------
// Integer key scores (AVX512-VNNI): codes widened to int16, the query rounded to 16-bit fixed point per row (and per
// block, for per-channel scales), 32 products per vpdpwssd, exact int32 per lane. The rounding is part of the
// specification (reference.attend(fixed_point=16)): a relative step of 2^-15 of the row's largest |q * s|, far finer
// than a bfloat16 query (2^-8 per element) and than the keys' own quantization.
// ---------------------------------------------------------------------------------------------------------------

inline __mmask32 lanes32(int k) {
  return k >= 32 ? __mmask32(0xFFFFFFFFu) : k <= 0 ? __mmask32(0) : __mmask32((1u << k) - 1);
}

// The codes of nt tokens widened to int16, at lanes [0, n) of rows of `stride` lanes (the other lanes untouched):
// 8 bit in channel order; 4 bit the low nibbles (even channels) at [0, n/2), the high ones (odd channels) at [n/2, n).
template <int W>
void widen16_block(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int16_t* out, int stride) {
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    int16_t* o = out + t * stride;
    if constexpr (W == 8) {
      for (int v = 0; 32 * v < c.n; ++v) {
        const __mmask32 k = lanes32(c.n - 32 * v);
        _mm512_mask_storeu_epi16(o + 32 * v, k, _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, p + 32 * v)));
      }
    } else if constexpr (W == 4) {
      const int nb = c.n / 2;
      for (int u = 0; 32 * u < nb; ++u) {
        const __mmask32 k = lanes32(nb - 32 * u);
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, p + 32 * u));
        _mm512_mask_storeu_epi16(o + 32 * u, k, _mm512_and_si512(w, _mm512_set1_epi16(15)));
        _mm512_mask_storeu_epi16(o + nb + 32 * u, k, _mm512_srli_epi16(w, 4));
      }
    } else {  // 2 bit: channel 4i + j at lane j * n/4 + i
      const int nb = c.n / 4;
      const __m512i three = _mm512_set1_epi16(3);
      for (int u = 0; 32 * u < nb; ++u) {
        const __mmask32 k = lanes32(nb - 32 * u);
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(k, p + 32 * u));
        for (int j = 0; j < 4; ++j)
          _mm512_mask_storeu_epi16(o + j * nb + 32 * u, k, _mm512_and_si512(_mm512_srli_epi16(w, 2 * j), three));
      }
    }
  }
}

// max |q * s| over the class's channels (s per channel; null: 1), both in the class's channel order.
float query_max(const Cls& c, const float* q, const float* s) {
  __m512 mx = _mm512_setzero_ps();
  for (int i = 0; i < c.n; i += 16) {
    const __mmask16 k = lanes(c.n - i);
    __m512 x = _mm512_maskz_loadu_ps(k, q + i);
    if (s) x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(k, s + i));
    mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
  }
  return _mm512_reduce_max_ps(mx);
}

// q16[0, n) = round(q * s / scale) in the widened codes' lane order (0 where scale is 0); nat: n + 64 scratch.
void query16(const Cls& c, const float* q, const float* s, float scale, int16_t* nat, int16_t* q16) {
  if (!(scale > 0.0f)) {
    std::fill(q16, q16 + c.n, int16_t(0));
    return;
  }
  const __m512 sv = _mm512_set1_ps(scale);
  int16_t* dst = c.width == 8 ? q16 : nat;
  for (int i = 0; i < c.n; i += 16) {
    const __mmask16 k = lanes(c.n - i);
    __m512 x = _mm512_maskz_loadu_ps(k, q + i);
    if (s) x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(k, s + i));
    _mm512_mask_cvtepi32_storeu_epi16(dst + i, k, _mm512_cvt_roundps_epi32(_mm512_div_ps(x, sv),
                                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (c.width == 2) {  // natural order -> lane j * n/4 + i holds channel 4i + j
    const int nb = c.n / 4;
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < nb; ++i) q16[j * nb + i] = nat[4 * i + j];
  }
  if (c.width == 4) {  // natural order -> the even channels, then the odd ones
    alignas(64) static const int16_t ie[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                               32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
    alignas(64) static const int16_t io[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                               33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    const __m512i even = _mm512_load_si512(ie), odd = _mm512_load_si512(io);
    const int nb = c.n / 2;
    for (int u = 0; 32 * u < nb; ++u) {
      const int m = nb - 32 * u;  // bytes (channel pairs) in this chunk
      const __m512i a = _mm512_maskz_loadu_epi16(lanes32(2 * m), nat + 64 * u);
      const __m512i b = _mm512_maskz_loadu_epi16(lanes32(2 * m - 32), nat + 64 * u + 32);
      _mm512_mask_storeu_epi16(q16 + 32 * u, lanes32(m), _mm512_permutex2var_epi16(a, even, b));
      _mm512_mask_storeu_epi16(q16 + nb + 32 * u, lanes32(m), _mm512_permutex2var_epi16(a, odd, b));
    }
  }
}

// dots[t] = kb[t] . q16 for t < nt, kb rows of 32 * nv lanes every rs lanes (exact int32 per lane, then summed in
// float; rows past nt are read, dropped).
template <int NV>
void dots16_n(const int16_t* kb, const int16_t* q16, int nv, int nt, float* dots, int rs) {
  constexpr int CAP = NV > 0 ? NV : 8;
  __m512i qv[CAP];
  const int n = NV > 0 ? NV : nv;
  for (int v = 0; v < n && v < CAP; ++v) qv[v] = _mm512_loadu_si512(q16 + 32 * v);
  for (int t0 = 0; t0 < nt; t0 += 16) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) {
      const int16_t* k = kb + (t0 + i) * rs;
      __m512i a = _mm512_setzero_si512();
      for (int v = 0; v < n; ++v)
        a = _mm512_dpwssd_epi32(a, _mm512_loadu_si512(k + 32 * v), v < CAP ? qv[v] : _mm512_loadu_si512(q16 + 32 * v));
      acc[i] = _mm512_cvtepi32_ps(a);
    }
    _mm512_mask_storeu_ps(dots + t0, lanes(nt - t0), hsum16(acc));
  }
}

void dots16(const int16_t* kb, const int16_t* q16, int nv, int nt, float* dots, int rs) {
  switch (nv) {
    case 1: return dots16_n<1>(kb, q16, nv, nt, dots, rs);
    case 2: return dots16_n<2>(kb, q16, nv, nt, dots, rs);
    case 4: return dots16_n<4>(kb, q16, nv, nt, dots, rs);
    default: return dots16_n<0>(kb, q16, nv, nt, dots, rs);
  }
}

void widen16(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int16_t* out, int stride) {
  if (c.width == 8) widen16_block<8>(c, p0, dt, nt, out, stride);
  else if (c.width == 4) widen16_block<4>(c, p0, dt, nt, out, stride);
  else widen16_block<2>(c, p0, dt, nt, out, stride);
}
// acc[r][0, n) += step[r] * sum_t w16[r][t] * codes_t for the rows r0 .. r0 + NR of a quantized value class, channel
// order; w16: [R][BT] int16 weights (zero past nt, nt rounded up to even), read as pairs of tokens. Per pair of tokens
// and 16 channels, one vpermt2b lays out (code_t, code_t+1) as int16 pairs, one vpdpwssd per row adds
// w_t code_t + w_t+1 code_t+1 (exact int32: 64 tokens * 255 * 32767 < 2^31).
template <int W, int NR, int NV>
void vacc16_chunk(const uint8_t* p0, int64_t dt, int nt, int c0, int nch, const int16_t* w16, const float* step,
                  float* acc, int accstride, int r0) {
  struct Pick {
    alignas(64) uint8_t v[4][64];  // vector v, byte 4j: token t's channel 16v + j; byte 4j + 2: token t + 1's
  };
  static const Pick pick = [] {
    Pick p{};
    for (int v = 0; v < 4; ++v)
      for (int j = 0; j < 16; ++j) p.v[v][4 * j] = uint8_t(16 * v + j), p.v[v][4 * j + 2] = uint8_t(64 + 16 * v + j);
    return p;
  }();
  struct Interleave {
    alignas(64) uint8_t v[2][64];  // token u's channels: byte 2i from lo[32u + i], 2i + 1 from hi[32u + i]
  };
  static const Interleave il = [] {
    Interleave p{};
    for (int u = 0; u < 2; ++u)
      for (int i = 0; i < 32; ++i) p.v[u][2 * i] = uint8_t(32 * u + i), p.v[u][2 * i + 1] = uint8_t(64 + 32 * u + i);
    return p;
  }();
  const __m512i il0 = _mm512_load_si512(il.v[0]), il1 = _mm512_load_si512(il.v[1]);
  struct Two {
    alignas(64) uint8_t rep[64];    // channel c's byte: c / 4
    alignas(64) uint8_t shift[64];  // bit offset of channel c in its qword after rep: 8 (c % 8) + 2 (c % 4)
  };
  static const Two two_bit = [] {
    Two p{};
    for (int c = 0; c < 64; ++c) p.rep[c] = uint8_t(c / 4), p.shift[c] = uint8_t(8 * (c % 8) + 2 * (c % 4));
    return p;
  }();
  const __m512i rep2 = _mm512_load_si512(two_bit.rep), shift2 = _mm512_load_si512(two_bit.shift);
  const __m512i three = _mm512_set1_epi8(3);
  const __mmask64 even_bytes = 0x5555555555555555ULL;
  const int32_t* wp = reinterpret_cast<const int32_t*>(w16);
  {
    __m512i a[NR][NV];
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_setzero_si512();
    __m512i idx[NV];
    for (int v = 0; v < NV; ++v) idx[v] = _mm512_load_si512(pick.v[v]);
    for (int t = 0; t < nt; t += 2) {
      const bool two = t + 1 < nt;
      __m512i x, y;  // the two tokens' codes of the chunk, one byte per channel (x: token t, y: token t + 1)
      if constexpr (W == 8) {
        const __mmask64 k = nch >= 64 ? ~__mmask64(0) : ((__mmask64(1) << nch) - 1);
        x = _mm512_maskz_loadu_epi8(k, p0 + t * dt + c0);
        y = two ? _mm512_maskz_loadu_epi8(k, p0 + (t + 1) * dt + c0) : _mm512_setzero_si512();
      } else if constexpr (W == 2) {
        // 2 bit: each byte copied to its 4 channels' places (vpermb), each copy shifted to its 2 bits (vpmultishiftqb)
        const __mmask16 k = lanes(nch / 4);
        x = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift2, _mm512_permutexvar_epi8(
                                 rep2, _mm512_castsi128_si512(_mm_maskz_loadu_epi8(k, p0 + t * dt + c0 / 4)))), three);
        y = two ? _mm512_and_si512(_mm512_multishift_epi64_epi8(shift2, _mm512_permutexvar_epi8(
                      rep2, _mm512_castsi128_si512(_mm_maskz_loadu_epi8(k, p0 + (t + 1) * dt + c0 / 4)))), three)
                : _mm512_setzero_si512();
      } else {
        // 4 bit: both tokens' bytes in one register (t: bytes 0-31, t + 1: 32-63), nibbles split, then interleaved
        // back to channel order per token (channel 2i: low nibble of byte i).
        const __mmask32 k = lanes32(nch / 2);
        const __m256i bt = _mm256_maskz_loadu_epi8(k, p0 + t * dt + c0 / 2);
        const __m256i bu = two ? _mm256_maskz_loadu_epi8(k, p0 + (t + 1) * dt + c0 / 2) : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(bt), bu, 1);
        const __m512i m15 = _mm512_set1_epi8(15);
        const __m512i lo = _mm512_and_si512(both, m15), hi = _mm512_and_si512(_mm512_srli_epi16(both, 4), m15);
        x = _mm512_permutex2var_epi8(lo, il0, hi);
        y = _mm512_permutex2var_epi8(lo, il1, hi);
      }
      __m512i pr[NV];
      for (int v = 0; v < NV; ++v) pr[v] = _mm512_maskz_permutex2var_epi8(even_bytes, x, idx[v], y);
      for (int r = 0; r < NR; ++r) {
        const __m512i wr = _mm512_set1_epi32(wp[(r0 + r) * (BT / 2) + t / 2]);
        for (int v = 0; v < NV; ++v) a[r][v] = _mm512_dpwssd_epi32(a[r][v], pr[v], wr);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 sv = _mm512_set1_ps(step[r0 + r]);
      float* o = acc + (r0 + r) * accstride + c0;
      for (int v = 0; v < NV; ++v)
        _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(a[r][v]), _mm512_loadu_ps(o + 16 * v)));
    }
  }
}

template <int W, int NR>
void vacc16_rows(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const int16_t* w16, const float* step,
                 float* acc, int accstride, int r0) {
  for (int c0 = 0; c0 < c.n; c0 += 64) {
    const int nch = std::min(64, c.n - c0);
    switch ((nch + 15) / 16) {
      case 1: vacc16_chunk<W, NR, 1>(p0, dt, nt, c0, nch, w16, step, acc, accstride, r0); break;
      case 2: vacc16_chunk<W, NR, 2>(p0, dt, nt, c0, nch, w16, step, acc, accstride, r0); break;
      case 3: vacc16_chunk<W, NR, 3>(p0, dt, nt, c0, nch, w16, step, acc, accstride, r0); break;
      default: vacc16_chunk<W, NR, 4>(p0, dt, nt, c0, nch, w16, step, acc, accstride, r0); break;
    }
  }
}

template <int W>
void vacc16(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int R, const int16_t* w16, const float* step,
            float* acc, int accstride) {
  for (int r0 = 0; r0 < R; r0 += 4) {
    switch (std::min(4, R - r0)) {
      case 1: vacc16_rows<W, 1>(c, p0, dt, nt, w16, step, acc, accstride, r0); break;
      case 2: vacc16_rows<W, 2>(c, p0, dt, nt, w16, step, acc, accstride, r0); break;
      case 3: vacc16_rows<W, 3>(c, p0, dt, nt, w16, step, acc, accstride, r0); break;
      default: vacc16_rows<W, 4>(c, p0, dt, nt, w16, step, acc, accstride, r0); break;
    }
  }
}

float block_max(const float* x, int n);

// w16[0, nt) = round(w / step), step = max w / 32767 (returned; 0 and w16 0 when every w is 0), zero up to even nt.
float weights16(const float* w, int nt, int16_t* w16) {
  const float mx = block_max(w, nt);
  const int ne = (nt + 1) / 2 * 2;
  if (!(mx > 0.0f)) {
    std::fill(w16, w16 + ne, int16_t(0));
    return 0.0f;
  }
  const float step = mx / 32767.0f;
  const __m512 sv = _mm512_set1_ps(step);
  for (int i = 0; i < nt; i += 16) {
    const __mmask16 k = lanes(nt - i);
    _mm512_mask_cvtepi32_storeu_epi16(w16 + i, k, _mm512_cvt_roundps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(k, w + i), sv),
                                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  if (ne > nt) w16[nt] = 0;
  return step;
}
#endif  // ECHOKV_VNNI
#endif  // ECHOKV_AVX512

#ifdef ECHOKV_AVX2
// ---------------------------------------------------------------------------------------------------------------
// AVX2 primitives (8 float lanes, no masked byte loads): the layouts of the AVX-512 float path, 2-bit classes
// included; a class's tail is read by overlapping register loads (never past its bytes) and stored through a mask
// only where a full store would land on what is already written.
// ---------------------------------------------------------------------------------------------------------------

alignas(32) constexpr int32_t kLaneMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// Lanes [0, k) set.
inline __m256i mask8(int k) {
  k = k < 0 ? 0 : k > 8 ? 8 : k;
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMask + 8 - k));
}

// m floats from p (lanes past m zero) and a store of m lanes: plain moves when m >= 8 (a masked store is slow on
// AMD's cores, so only the tails take one).
inline __m256 load8f(const float* p, int m) { return m >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask8(m)); }
inline void store8f(float* p, __m256 v, int m) {
  if (m >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, mask8(m), v);
}

// `bytes` (<= 8) bytes from p, zero above, in registers: two overlapping loads, never a read past them (bytes
// copied through memory would stall the wide load that follows them).
inline uint64_t load_u64(const uint8_t* p, int bytes) {
  if (bytes >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
  if (bytes >= 4) {
    uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + bytes - 4, 4);
    return uint64_t(a) | (uint64_t(b) << (8 * (bytes - 4)));
  }
  if (bytes >= 2) {
    uint16_t a, b;
    std::memcpy(&a, p, 2);
    std::memcpy(&b, p + bytes - 2, 2);
    return uint64_t(a) | (uint64_t(b) << (8 * (bytes - 2)));
  }
  return bytes == 1 ? p[0] : 0;
}

// `bytes` (<= 16) bytes from p, zero above.
inline __m128i load_partial(const uint8_t* p, int bytes) {
  if (bytes <= 8) return _mm_cvtsi64_si128(static_cast<long long>(load_u64(p, bytes)));
  return _mm_set_epi64x(static_cast<long long>(load_u64(p + 8, bytes - 8)), static_cast<long long>(load_u64(p, 8)));
}

// Up to 8 bytes from p in the low half, zero above.
inline __m128i load8b(const uint8_t* p, int bytes) {
  return _mm_cvtsi64_si128(static_cast<long long>(load_u64(p, bytes)));
}

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

inline float reduce_max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Chunk j (8 channels of the padded layout) of one token, as float codes (zero past the class).
template <int W, bool BF16>
inline __m256 load_chunk8(const uint8_t* p, int j, int n) {
  if constexpr (W == 16) {
    const int m = n - 8 * j;
    const __m128i x = m >= 8 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j))
                             : load_partial(p + 16 * j, 2 * m);
    if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
    else return _mm256_cvtph_ps(x);
  } else if constexpr (W == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load8b(p + 8 * j, n - 8 * j)));
  } else if constexpr (W == 4) {  // per 32 channels (16 bytes): the low nibbles of bytes 0-7, 8-15, then the high
    const int off = 16 * (j >> 2) + 8 * (j & 1);
    const __m256i w = _mm256_cvtepu8_epi32(load8b(p + off, n / 2 - off));
    return _mm256_cvtepi32_ps((j & 2) ? _mm256_srli_epi32(w, 4) : _mm256_and_si256(w, _mm256_set1_epi32(15)));
  } else {  // 2 bit, channel order, 4 per byte from the low bits
    const int m = n - 8 * j;
    uint32_t x = 0;
    if (m >= 8) {
      uint16_t y;
      std::memcpy(&y, p + 2 * j, 2);
      x = y;
    } else if (m > 0) {
      x = p[2 * j];  // n % 4 == 0: one byte left
    }
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(x)),
                                        _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(3)));
  }
}

// exp(x) for x <= 0 (the Cephes polynomial of exp512), exactly 0 for x = -inf.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n from the exponent bits: n >= -126 here, so a normal number
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// out[i] = sum of the 8 lanes of v[i].
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// A store of m lanes at o + pos that may write all 8 when they stay inside the row's `room` floats: what it writes
// past the class is rewritten by the classes widened after it, or is padding (finite, dotted with a zero query).
inline void store_room(float* o, int pos, __m256 v, int m, int room) { store8f(o + pos, v, pos + 8 <= room ? 8 : m); }

// widen_block_avx on 8 lanes; room: floats of the row from the class's first (the classes are widened in order).
template <int W, bool BF16>
void widen_block_avx2(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* sv, const float* zv,
                      float* kbuf, int kstride, int room) {
  const bool quant = W != 16;
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    float* o = kbuf + t * kstride;
    const __m256 s = _mm256_set1_ps(quant && !c.chan ? sv[t] : 1.0f);
    const __m256 z = _mm256_set1_ps(quant && !c.chan ? zv[t] : 0.0f);
    if constexpr (W == 4) {  // compact layout: per 16 stored bytes (m of them), the m low nibbles, then the m high
      const int nb = c.n / 2;
      for (int k = 0; 16 * k < nb; ++k) {
        const int m = std::min(16, nb - 16 * k);
        __m256 lo[2], hi[2];
        for (int h = 0; 8 * h < m; ++h) {
          const int ms = std::min(8, m - 8 * h), a = 32 * k + 8 * h, e = 32 * k + m + 8 * h;
          const __m256i w = _mm256_cvtepu8_epi32(load8b(p + 16 * k + 8 * h, ms));
          lo[h] = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15)));
          hi[h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
          if (c.chan) {
            lo[h] = _mm256_fmadd_ps(lo[h], load8f(sv + a, ms), load8f(zv + a, ms));
            hi[h] = _mm256_fmadd_ps(hi[h], load8f(sv + e, ms), load8f(zv + e, ms));
          } else {
            lo[h] = _mm256_fmadd_ps(lo[h], s, z);
            hi[h] = _mm256_fmadd_ps(hi[h], s, z);
          }
        }
        // the low nibbles first: a full store of the second may run into the high ones' places
        for (int h = 0; 8 * h < m; ++h) store_room(o, 32 * k + 8 * h, lo[h], std::min(8, m - 8 * h), room);
        for (int h = 0; 8 * h < m; ++h) store_room(o, 32 * k + m + 8 * h, hi[h], std::min(8, m - 8 * h), room);
      }
    } else {
      for (int j = 0; 8 * j < c.n; ++j) {
        const __m256 x = load_chunk8<W, BF16>(p, j, c.n);
        const int m = c.n - 8 * j;
        if (quant && c.chan)
          store_room(o, 8 * j, _mm256_fmadd_ps(x, load8f(sv + 8 * j, m), load8f(zv + 8 * j, m)), m, room);
        else
          store_room(o, 8 * j, quant ? _mm256_fmadd_ps(x, s, z) : x, m, room);
      }
    }
  }
}

// dots[t] = q . kbuf[t] for t < nt, 8 tokens at a time (rows past nt, inside the BT-row scratch, are read).
template <int NCH>
void dots_avx2_n(const float* kbuf, int npad, const float* q, int nt, float* dots) {
  const int nch = NCH > 0 ? NCH : npad / 8;
  for (int t0 = 0; t0 < nt; t0 += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) {
      const float* k = kbuf + (t0 + i) * npad;
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
      for (int j = 1; j < nch; ++j) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * j), _mm256_loadu_ps(k + 8 * j), a);
      acc[i] = a;
    }
    store8f(dots + t0, hsum8(acc), nt - t0);
  }
}

void dots_avx2(const float* kbuf, int npad, const float* q, int nt, float* dots) {
  switch (npad / 8) {
    case 2: return dots_avx2_n<2>(kbuf, npad, q, nt, dots);
    case 4: return dots_avx2_n<4>(kbuf, npad, q, nt, dots);
    case 6: return dots_avx2_n<6>(kbuf, npad, q, nt, dots);
    case 8: return dots_avx2_n<8>(kbuf, npad, q, nt, dots);
    default: return dots_avx2_n<0>(kbuf, npad, q, nt, dots);
  }
}

// acc[r][8 j0 .. 8 (j0 + NC)) += sum_t w[r][t] * codes_t, rows r0 .. r0 + NR, codes widened in registers.
template <int W, bool BF16, int NR, int NC>
void vacc_tile8(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* w, float* acc, int accstride,
                int r0, int j0) {
  __m256 a[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NC; ++k) a[r][k] = _mm256_loadu_ps(acc + (r0 + r) * accstride + 8 * (j0 + k));
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    __m256 x[NC];
    for (int k = 0; k < NC; ++k) x[k] = load_chunk8<W, BF16>(p, j0 + k, c.n);
    for (int r = 0; r < NR; ++r) {
      const __m256 wr = _mm256_broadcast_ss(w + (r0 + r) * BT + t);
      for (int k = 0; k < NC; ++k) a[r][k] = _mm256_fmadd_ps(wr, x[k], a[r][k]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NC; ++k) _mm256_storeu_ps(acc + (r0 + r) * accstride + 8 * (j0 + k), a[r][k]);
}

// 16 registers: at most 3 rows x 4 chunks of accumulators per tile.
template <int W, bool BF16, int NR>
void vacc_rows8(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* w, float* acc, int accstride,
                int r0, int j0, int nc) {
  switch (nc) {
    case 1: return vacc_tile8<W, BF16, NR, 1>(c, p0, dt, nt, w, acc, accstride, r0, j0);
    case 2: return vacc_tile8<W, BF16, NR, 2>(c, p0, dt, nt, w, acc, accstride, r0, j0);
    case 3: return vacc_tile8<W, BF16, NR, 3>(c, p0, dt, nt, w, acc, accstride, r0, j0);
    default: return vacc_tile8<W, BF16, NR, 4>(c, p0, dt, nt, w, acc, accstride, r0, j0);
  }
}

template <int W, bool BF16>
void vacc_avx2(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int R, const float* w, float* acc,
               int accstride) {
  const int nch = c.npad / 8;
  for (int j0 = 0; j0 < nch; j0 += 4) {
    const int nc = std::min(4, nch - j0);
    for (int r0 = 0; r0 < R; r0 += 3) {
      switch (std::min(3, R - r0)) {
        case 1: vacc_rows8<W, BF16, 1>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
        case 2: vacc_rows8<W, BF16, 2>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
        default: vacc_rows8<W, BF16, 3>(c, p0, dt, nt, w, acc, accstride, r0, j0, nc); break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 integer key scores: the VNNI path's layout and fixed-point query, with vpmaddwd + vpaddd for vpdpwssd (the
// same exact int32 per lane).
// ---------------------------------------------------------------------------------------------------------------

// m (< 16) int16 lanes of v at o.
inline void store16_tail(int16_t* o, __m256i v, int m) {
  alignas(32) int16_t tmp[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
  if (m > 0) std::memcpy(o, tmp, 2 * m);
}

// 16 int16 lanes at o + pos, of which m belong to the class: all 16 written when they stay inside the row's room
// (past the class: lanes of the classes widened after it, or zero-query padding), else only m.
inline void store16_room(int16_t* o, int pos, __m256i v, int m, int room) {
  if (m >= 16 || pos + 16 <= room) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + pos), v);
  else store16_tail(o + pos, v, m);
}

// widen16_block (see the VNNI path) on AVX2; room: lanes of the row from the class's first.
template <int W>
void widen16_block(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int16_t* out, int stride, int room) {
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    int16_t* o = out + t * stride;
    if constexpr (W == 8) {
      for (int v = 0; 16 * v < c.n; ++v) {
        const int m = c.n - 16 * v;
        const __m128i x = m >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))
                                  : load_partial(p + 16 * v, m);
        store16_room(o, 16 * v, _mm256_cvtepu8_epi16(x), m, room);
      }
    } else if constexpr (W == 4) {
      // the low nibbles before the high ones (a full store may run into their places); one load up to 32 channels
      const int nb = c.n / 2;
      const __m256i m15 = _mm256_set1_epi16(15);
      if (nb <= 16) {
        const __m256i w = _mm256_cvtepu8_epi16(nb == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                                        : load_partial(p, nb));
        store16_room(o, 0, _mm256_and_si256(w, m15), nb, room);
        store16_room(o, nb, _mm256_srli_epi16(w, 4), nb, room);
        continue;
      }
      for (int half = 0; half < 2; ++half)
        for (int u = 0; 16 * u < nb; ++u) {
          const int m = nb - 16 * u;
          const __m128i x = m >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * u))
                                    : load_partial(p + 16 * u, m);
          const __m256i w = _mm256_cvtepu8_epi16(x);
          store16_room(o, half * nb + 16 * u, half ? _mm256_srli_epi16(w, 4) : _mm256_and_si256(w, m15), m, room);
        }
    } else {  // 2 bit: channel 4i + j at lane j * n/4 + i, written j by j for the same reason
      const int nb = c.n / 4;
      const __m256i three = _mm256_set1_epi16(3);
      if (nb <= 16) {  // up to 64 channels: one load
        const __m256i w = _mm256_cvtepu8_epi16(nb == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                                        : load_partial(p, nb));
        for (int j = 0; j < 4; ++j)
          store16_room(o, j * nb, _mm256_and_si256(_mm256_srli_epi16(w, 2 * j), three), nb, room);
        continue;
      }
      for (int j = 0; j < 4; ++j)
        for (int u = 0; 16 * u < nb; ++u) {
          const int m = nb - 16 * u;
          const __m128i x = m >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * u))
                                    : load_partial(p + 16 * u, m);
          const __m256i w = _mm256_cvtepu8_epi16(x);
          store16_room(o, j * nb + 16 * u, _mm256_and_si256(_mm256_srli_epi16(w, 2 * j), three), m, room);
        }
    }
  }
}

void widen16(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int16_t* out, int stride) {
  const int room = stride - c.loff;  // out points at the class's first lane of row 0
  if (c.width == 8) widen16_block<8>(c, p0, dt, nt, out, stride, room);
  else if (c.width == 4) widen16_block<4>(c, p0, dt, nt, out, stride, room);
  else widen16_block<2>(c, p0, dt, nt, out, stride, room);
}

// max |q * s| over the class's channels (s per channel; null: 1).
float query_max(const Cls& c, const float* q, const float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < c.n; i += 8) {
    __m256 x = load8f(q + i, c.n - i);
    if (s) x = _mm256_mul_ps(x, load8f(s + i, c.n - i));
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, x));
  }
  return reduce_max8(mx);
}

// q16[0, n) = round(q * s / scale) in the widened codes' lane order (0 where scale is 0); nat: n + 64 scratch.
void query16(const Cls& c, const float* q, const float* s, float scale, int16_t* nat, int16_t* q16) {
  if (!(scale > 0.0f)) {
    std::fill(q16, q16 + c.n, int16_t(0));
    return;
  }
  const __m256 sv = _mm256_set1_ps(scale);
  int16_t* dst = c.width == 8 ? q16 : nat;
  for (int i = 0; i < c.n; i += 8) {
    __m256 x = load8f(q + i, c.n - i);
    if (s) x = _mm256_mul_ps(x, load8f(s + i, c.n - i));
    const __m256i r = _mm256_cvtps_epi32(_mm256_div_ps(x, sv));  // nearest, ties to even (MXCSR's default)
    const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    alignas(16) int16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), packed);
    std::memcpy(dst + i, tmp, 2 * std::min(8, c.n - i));
  }
  if (c.width == 2) {  // natural order -> lane j * n/4 + i holds channel 4i + j
    const int nb = c.n / 4;
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < nb; ++i) q16[j * nb + i] = nat[4 * i + j];
  }
  if (c.width == 4) {  // natural order -> the even channels, then the odd ones
    const int nb = c.n / 2;
    for (int i = 0; i < nb; ++i) q16[i] = nat[2 * i], q16[nb + i] = nat[2 * i + 1];
  }
}

// dots[t] = kb[t] . q16 for t < nt, kb rows of 32 * nv lanes every rs lanes (exact int32 per lane, then summed in
// float; rows past nt are read, dropped).
template <int NV>
void dots16_n(const int16_t* kb, const int16_t* q16, int nv, int nt, float* dots, int rs) {
  const int n = 2 * (NV > 0 ? NV : nv);  // 16-lane vectors per row
  for (int t0 = 0; t0 < nt; t0 += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) {
      const int16_t* k = kb + (t0 + i) * rs;
      __m256i a = _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16)));
      for (int v = 1; v < n; ++v)
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 16 * v)),
                                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + 16 * v))));
      acc[i] = _mm256_cvtepi32_ps(a);
    }
    store8f(dots + t0, hsum8(acc), nt - t0);
  }
}

void dots16(const int16_t* kb, const int16_t* q16, int nv, int nt, float* dots, int rs) {
  switch (nv) {
    case 1: return dots16_n<1>(kb, q16, nv, nt, dots, rs);
    case 2: return dots16_n<2>(kb, q16, nv, nt, dots, rs);
    case 4: return dots16_n<4>(kb, q16, nv, nt, dots, rs);
    default: return dots16_n<0>(kb, q16, nv, nt, dots, rs);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 integer values: the VNNI path's fixed-point weights; per pair of tokens and 16 channels the two tokens' codes
// interleaved as int16 pairs (vpunpck + vpmovzxbw), one vpmaddwd + vpaddd per row and 8 channels (exact int32).
// ---------------------------------------------------------------------------------------------------------------

float block_max(const float* x, int n);

// w16[0, nt) = round(w / step), step = max w / 32767 (returned; 0 and w16 0 when every w is 0), zero up to even nt.
float weights16(const float* w, int nt, int16_t* w16) {
  const float mx = block_max(w, nt);
  const int ne = (nt + 1) / 2 * 2;
  if (!(mx > 0.0f)) {
    std::fill(w16, w16 + ne, int16_t(0));
    return 0.0f;
  }
  const float step = mx / 32767.0f;
  const __m256 sv = _mm256_set1_ps(step);
  for (int i = 0; i < nt; i += 8) {
    const __m256i r = _mm256_cvtps_epi32(_mm256_div_ps(load8f(w + i, nt - i), sv));
    const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (nt - i >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w16 + i), packed);
    } else {
      alignas(16) int16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), packed);
      std::memcpy(w16 + i, tmp, 2 * (nt - i));
    }
  }
  if (ne > nt) w16[nt] = 0;
  return step;
}

// Channels [c0, c0 + 16) of one token's value codes as bytes in channel order (m of them in the class; zero past
// them). 2 bit: code << 2 (c % 4), the shift undone per channel on the int32 sums (a power of two: exact).
template <int W>
inline __m128i value_bytes(const uint8_t* p, int c0, int m) {
  if constexpr (W == 8) {
    return m >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c0)) : load_partial(p + c0, m);
  } else if constexpr (W == 4) {
    const __m128i b = load8b(p + c0 / 2, (std::min(m, 16) + 1) / 2);
    const __m128i m15 = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(b, m15), _mm_and_si128(_mm_srli_epi16(b, 4), m15));
  } else {
    const __m128i b = _mm_cvtsi64_si128(static_cast<long long>(load_u64(p + c0 / 4, (std::min(m, 16) + 3) / 4)));
    const __m128i rep = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    return _mm_and_si128(rep, _mm_set1_epi32(static_cast<int>(0xC0300C03u)));
  }
}

// acc[r][c0, c0 + 16 NC) += step[r] * sum_t w16[r][t] * codes_t for rows r0 .. r0 + NR (channel order).
template <int W, int NR, int NC>
void vacc16_tile(const uint8_t* p0, int64_t dt, int nt, int n, int c0, const int16_t* w16, const float* step,
                 float* acc, int accstride, int r0) {
  const int32_t* wp = reinterpret_cast<const int32_t*>(w16);
  __m256i a[NR][2 * NC];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < 2 * NC; ++j) a[r][j] = _mm256_setzero_si256();
  for (int t = 0; t < nt; t += 2) {
    const uint8_t* px = p0 + t * dt;
    const bool two = t + 1 < nt;
    __m256i pr[2 * NC];
    for (int k = 0; k < NC; ++k) {
      const int cc = c0 + 16 * k;
      const __m128i x = value_bytes<W>(px, cc, n - cc);
      const __m128i y = two ? value_bytes<W>(px + dt, cc, n - cc) : _mm_setzero_si128();
      pr[2 * k] = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x, y));
      pr[2 * k + 1] = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(x, y));
    }
    for (int r = 0; r < NR; ++r) {
      const __m256i wr = _mm256_set1_epi32(wp[(r0 + r) * (BT / 2) + t / 2]);
      for (int j = 0; j < 2 * NC; ++j) a[r][j] = _mm256_add_epi32(a[r][j], _mm256_madd_epi16(pr[j], wr));
    }
  }
  const __m256 unshift = W == 2 ? _mm256_setr_ps(1.0f, 0.25f, 0.0625f, 0.015625f, 1.0f, 0.25f, 0.0625f, 0.015625f)
                                : _mm256_set1_ps(1.0f);
  for (int r = 0; r < NR; ++r) {
    const __m256 sv = _mm256_mul_ps(_mm256_set1_ps(step[r0 + r]), unshift);
    float* o = acc + (r0 + r) * accstride + c0;
    for (int j = 0; j < 2 * NC; ++j)
      _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(a[r][j]), _mm256_loadu_ps(o + 8 * j)));
  }
}

template <int W>
void vacc16(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int R, const int16_t* w16, const float* step,
            float* acc, int accstride) {
  // 16 registers: 3 rows x 16 channels, or 2 rows x 32, of accumulators per tile
  for (int r0 = 0; r0 < R; r0 += 3) {
    const int nr = std::min(3, R - r0);
    for (int c0 = 0; c0 < c.n; c0 += nr == 3 ? 16 : 32) {
      const bool wide = nr < 3 && c.n - c0 > 16;
      if (nr == 3) vacc16_tile<W, 3, 1>(p0, dt, nt, c.n, c0, w16, step, acc, accstride, r0);
      else if (nr == 2) wide ? vacc16_tile<W, 2, 2>(p0, dt, nt, c.n, c0, w16, step, acc, accstride, r0)
                             : vacc16_tile<W, 2, 1>(p0, dt, nt, c.n, c0, w16, step, acc, accstride, r0);
      else wide ? vacc16_tile<W, 1, 2>(p0, dt, nt, c.n, c0, w16, step, acc, accstride, r0)
                : vacc16_tile<W, 1, 1>(p0, dt, nt, c.n, c0, w16, step, acc, accstride, r0);
    }
  }
}
#endif  // ECHOKV_AVX2

// ---------------------------------------------------------------------------------------------------------------
// Dispatch of the primitives
// ---------------------------------------------------------------------------------------------------------------

// Dequantized keys of nt tokens of class c into kbuf (rows of kstride floats, the class at its padded offset).
void widen_block(const Cls& c, const uint8_t* p0, int64_t dt, int nt, const float* sv, const float* zv, float* kbuf,
                 int kstride) {
  float* o = kbuf + c.foff;
#ifdef ECHOKV_AVX512
  if (c.width == 16) return c.bf16 ? widen_block_avx<16, true>(c, p0, dt, nt, sv, zv, o, kstride)
                                   : widen_block_avx<16, false>(c, p0, dt, nt, sv, zv, o, kstride);
  if (c.width == 8) return widen_block_avx<8, true>(c, p0, dt, nt, sv, zv, o, kstride);
  if (c.width == 4) return widen_block_avx<4, true>(c, p0, dt, nt, sv, zv, o, kstride);
#elif defined(ECHOKV_AVX2)
  const int room = kstride - c.foff;
  if (c.width == 16) return c.bf16 ? widen_block_avx2<16, true>(c, p0, dt, nt, sv, zv, o, kstride, room)
                                   : widen_block_avx2<16, false>(c, p0, dt, nt, sv, zv, o, kstride, room);
  if (c.width == 8) return widen_block_avx2<8, true>(c, p0, dt, nt, sv, zv, o, kstride, room);
  if (c.width == 4) return widen_block_avx2<4, true>(c, p0, dt, nt, sv, zv, o, kstride, room);
  return widen_block_avx2<2, true>(c, p0, dt, nt, sv, zv, o, kstride, room);
#endif
  {  // portable, and 2-bit classes without VNNI
  for (int t = 0; t < nt; ++t) {
    const uint8_t* p = p0 + t * dt;
    float* row = o + t * kstride;
    for (int ch = 0; ch < c.n; ++ch) {
      const int at = compact_index(c, ch);
      const float s = c.width == 16 ? 1.0f : c.chan ? sv[at] : sv[t], z = c.width == 16 ? 0.0f : c.chan ? zv[at] : zv[t];
      float x;
      if (c.width == 16)
        x = c.bf16 ? static_cast<float>(reinterpret_cast<const c10::BFloat16*>(p)[ch])
                   : static_cast<float>(reinterpret_cast<const at::Half*>(p)[ch]);
      else if (c.width == 8)
        x = p[ch];
      else if (c.width == 2)
        x = (p[ch / 4] >> (2 * (ch % 4))) & 3;
      else
        x = (ch % 2) ? (p[ch / 2] >> 4) : (p[ch / 2] & 15);
      row[at] = x * s + z;
    }
  }
  }
}

// Scale and zero of nt tokens from t0 (float16, any stride) as float.
void load_sz(const Cls& c, int64_t b, int64_t h, int64_t t0, int nt, float* sv, float* zv) {
  const at::Half* s = c.s + b * c.sb + h * c.sh + t0 * c.st;
  const at::Half* z = c.z + b * c.zb + h * c.zh + t0 * c.zt;
#ifdef ECHOKV_AVX512
  if (c.st == 1 && c.zt == 1) {
    for (int i = 0; i < nt; i += 16) {
      const __mmask16 k = lanes(nt - i);
      _mm512_mask_storeu_ps(sv + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s + i)));
      _mm512_mask_storeu_ps(zv + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, z + i)));
    }
    return;
  }
#elif defined(ECHOKV_AVX2)
  if (c.st == 1 && c.zt == 1) {
    int i = 0;
    for (; i + 8 <= nt; i += 8) {
      _mm256_storeu_ps(sv + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
      _mm256_storeu_ps(zv + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + i))));
    }
    for (; i < nt; ++i) sv[i] = static_cast<float>(s[i]), zv[i] = static_cast<float>(z[i]);
    return;
  }
#endif
  for (int i = 0; i < nt; ++i) sv[i] = static_cast<float>(s[i * c.st]), zv[i] = static_cast<float>(z[i * c.zt]);
}

// Scale and zero of a per-channel class for the block of tokens from t0, in the class's compact layout.
void load_sz_chan(const Cls& c, int64_t b, int64_t h, int64_t t0, float* sv, float* zv) {
  const int64_t row = t0 / BT;
  const at::Half* s = c.s + b * c.sb + h * c.sh + row * c.st;
  const at::Half* z = c.z + b * c.zb + h * c.zh + row * c.zt;
  for (int ch = 0; ch < c.n; ++ch) {
    const int at = compact_index(c, ch);
    sv[at] = static_cast<float>(s[ch]), zv[at] = static_cast<float>(z[ch]);
  }
}

// Scale and zero of a per-channel class for the block of tokens from t0, in channel order.
void load_sz_nat(const Cls& c, int64_t b, int64_t h, int64_t t0, float* sv, float* zv) {
  const int64_t row = t0 / BT;
  const at::Half* s = c.s + b * c.sb + h * c.sh + row * c.st;
  const at::Half* z = c.z + b * c.zb + h * c.zh + row * c.zt;
  int ch = 0;
#if defined(ECHOKV_AVX512) || defined(ECHOKV_AVX2)
  for (; ch + 8 <= c.n; ch += 8) {  // F16C: the scalar at::Half conversion cost more than the block's dots
    _mm256_storeu_ps(sv + ch, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + ch))));
    _mm256_storeu_ps(zv + ch, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + ch))));
  }
#endif
  for (; ch < c.n; ++ch) sv[ch] = static_cast<float>(s[ch]), zv[ch] = static_cast<float>(z[ch]);
}

// vis[t] = mask of token t (bool bytes, stride mt) for t < nt; any / all: whether some / every token is visible.
void visibility(const uint8_t* m, int64_t mt, int nt, uint8_t* vis, bool& any, bool& all) {
  int t = 0, seen = 0;
#if defined(ECHOKV_AVX512) || defined(ECHOKV_AVX2)
  if (mt == 1)  // one compare per 32 tokens (every block of a padded batch or with sinks takes this)
    for (; t + 32 <= nt; t += 32) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + t));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(vis + t), x);
      seen += 32 - __builtin_popcount(static_cast<unsigned>(
                       _mm256_movemask_epi8(_mm256_cmpeq_epi8(x, _mm256_setzero_si256()))));
    }
#endif
  for (; t < nt; ++t) seen += (vis[t] = m[t * mt]) != 0;
  any = seen > 0, all = seen == nt;
}

// sum of a[i] * b[i] for i < n.
float dotf(const float* a, const float* b, int n) {
#ifdef ECHOKV_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(ECHOKV_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    acc = _mm256_fmadd_ps(load8f(a + i, n - i), load8f(b + i, n - i), acc);
  }
  return reduce_add8(acc);
#else
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
#endif
}

// q[i] *= s[i] for i < n; returns the sum of q[i] * z[i] (before the scaling).
float scale_query(float* q, const float* s, const float* z, int n) {
#ifdef ECHOKV_AVX512
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(k, q + i);
    a = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, z + i), a);
    _mm512_mask_storeu_ps(q + i, k, _mm512_mul_ps(x, _mm512_maskz_loadu_ps(k, s + i)));
  }
  return _mm512_reduce_add_ps(a);
#elif defined(ECHOKV_AVX2)
  __m256 a = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    const __m256 x = load8f(q + i, n - i);
    a = _mm256_fmadd_ps(x, load8f(z + i, n - i), a);
    store8f(q + i, _mm256_mul_ps(x, load8f(s + i, n - i)), n - i);
  }
  return reduce_add8(a);
#else
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) acc += q[i] * z[i], q[i] *= s[i];
  return acc;
#endif
}

// max of x[0 .. n).
float block_max(const float* x, int n) {
#ifdef ECHOKV_AVX512
  __m512 m = _mm512_set1_ps(NEG_INF);
  for (int i = 0; i < n; i += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(NEG_INF), lanes(n - i), x + i));
  return _mm512_reduce_max_ps(m);
#elif defined(ECHOKV_AVX2)
  const __m256 ninf = _mm256_set1_ps(NEG_INF);
  __m256 m = ninf;
  for (int i = 0; i < n; i += 8) {
    const __m256 v = load8f(x + i, n - i);
    m = _mm256_max_ps(m, n - i >= 8 ? v : _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(mask8(n - i))));
  }
  return reduce_max8(m);
#else
  float m = NEG_INF;
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

// w[i] = p[i] * s[i] for i < n; returns sum p[i] * z[i] (the zero points' share).
float value_weights(const float* p, const float* s, const float* z, int n, float* w) {
#ifdef ECHOKV_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    const __m512 pv = _mm512_maskz_loadu_ps(k, p + i);
    _mm512_mask_storeu_ps(w + i, k, _mm512_mul_ps(pv, _mm512_maskz_loadu_ps(k, s + i)));
    acc = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(k, z + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(ECHOKV_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    const __m256 pv = load8f(p + i, n - i);
    store8f(w + i, _mm256_mul_ps(pv, load8f(s + i, n - i)), n - i);
    acc = _mm256_fmadd_ps(pv, load8f(z + i, n - i), acc);
  }
  return reduce_add8(acc);
#else
  float zs = 0.0f;
  for (int i = 0; i < n; ++i) w[i] = p[i] * s[i], zs += p[i] * z[i];
  return zs;
#endif
}

void dots(const float* kbuf, int npad, const float* q, int nt, float* out) {
#ifdef ECHOKV_AVX512
  dots_avx(kbuf, npad, q, nt, out);
#elif defined(ECHOKV_AVX2)
  dots_avx2(kbuf, npad, q, nt, out);
#else
  for (int t = 0; t < nt; ++t) {
    const float* k = kbuf + t * npad;
    float a = 0.0f;
    for (int i = 0; i < npad; ++i) a += q[i] * k[i];
    out[t] = a;
  }
#endif
}

// acc[r] += sum_t w[r][t] * codes_t over the class's padded channels (vbuf: [BT][npad] scratch for the plain path).
void vacc(const Cls& c, const uint8_t* p0, int64_t dt, int nt, int R, const float* w, float* acc, int accstride,
          float* vbuf) {
#ifdef ECHOKV_AVX512
  if (c.width == 16) return c.bf16 ? vacc_avx<16, true>(c, p0, dt, nt, R, w, acc, accstride)
                                   : vacc_avx<16, false>(c, p0, dt, nt, R, w, acc, accstride);
  if (c.width == 8) return vacc_avx<8, true>(c, p0, dt, nt, R, w, acc, accstride);
  if (c.width == 4) return vacc_avx<4, true>(c, p0, dt, nt, R, w, acc, accstride);
#elif defined(ECHOKV_AVX2)
  if (c.width == 16) return c.bf16 ? vacc_avx2<16, true>(c, p0, dt, nt, R, w, acc, accstride)
                                   : vacc_avx2<16, false>(c, p0, dt, nt, R, w, acc, accstride);
  if (c.width == 8) return vacc_avx2<8, true>(c, p0, dt, nt, R, w, acc, accstride);
  if (c.width == 4) return vacc_avx2<4, true>(c, p0, dt, nt, R, w, acc, accstride);
  return vacc_avx2<2, true>(c, p0, dt, nt, R, w, acc, accstride);
#endif
  // portable, and 2-bit classes without VNNI
  for (int t = 0; t < nt; ++t) widen_token_scalar(c, p0 + t * dt, vbuf + t * c.npad);
  for (int r = 0; r < R; ++r) {
    float* a = acc + r * accstride;
    for (int t = 0; t < nt; ++t) {
      const float wt = w[r * BT + t];
      const float* v = vbuf + t * c.npad;
      for (int i = 0; i < c.npad; ++i) a[i] += wt * v[i];
    }
  }
}

// p[i] = exp(x[i] - m) for i < n, returns their sum.
float exp_shift(const float* x, float m, int n, float* p) {
#ifdef ECHOKV_AVX512
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    const __m512 e2 = _mm512_maskz_mov_ps(k, e);
    _mm512_mask_storeu_ps(p + i, k, e2);
    sum = _mm512_add_ps(sum, e2);
  }
  return _mm512_reduce_add_ps(sum);
#elif defined(ECHOKV_AVX2)
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    __m256 e = exp256(_mm256_sub_ps(load8f(x + i, n - i), mv));
    if (n - i < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(mask8(n - i)));
    store8f(p + i, e, n - i);
    sum = _mm256_add_ps(sum, e);
  }
  return reduce_add8(sum);
#else
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += (p[i] = exp_scalar(x[i] - m));
  return sum;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------------------------

std::vector<Cls> parse_classes(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta,
                               int64_t B, int64_t H, int64_t T, const char* what) {
  TORCH_CHECK(meta.size() % 2 == 0 && tensors.size() == meta.size() / 2 * 3, "echokv attend: ", what,
              " classes need (width, n) pairs and (codes, scale, zero) triples");
  std::vector<Cls> out;
  int off = 0, poff = 0;
  for (size_t i = 0; i < meta.size() / 2; ++i) {
    Cls c;
    c.width = static_cast<int>(meta[2 * i]);
    c.n = static_cast<int>(meta[2 * i + 1]);
    TORCH_CHECK(c.width == 16 || c.width == 8 || c.width == 4 || c.width == 2, "echokv attend: width ", c.width,
                " not in 16/8/4/2");
    TORCH_CHECK(c.n >= 0, "echokv attend: negative class size");
    if (c.n == 0) continue;
    const at::Tensor& d = tensors[3 * i];
    TORCH_CHECK(d.dim() == 4 && d.size(0) == B && d.size(1) == H && d.size(2) == T, "echokv attend: ", what,
                " class ", c.width, " codes must be [B, H, T, *] = [", B, ", ", H, ", ", T, ", *], got ", d.sizes());
    TORCH_CHECK(d.size(3) <= 1 || d.stride(3) == 1, "echokv attend: the last dimension must be contiguous");
    TORCH_CHECK(c.width != 4 || c.n % 2 == 0, "echokv attend: a 4-bit class needs an even channel count");
    TORCH_CHECK(c.width != 2 || c.n % 4 == 0, "echokv attend: a 2-bit class needs a multiple of 4 channels");
    const int64_t need = c.width == 16 ? c.n : c.n * c.width / 8;
    TORCH_CHECK(d.size(3) >= need, "echokv attend: ", what, " class ", c.width, " holds ", d.size(3),
                " entries per token, needs ", need);
    if (c.width == 16) {
      TORCH_CHECK(d.scalar_type() == at::kBFloat16 || d.scalar_type() == at::kHalf,
                  "echokv attend: a 16-bit class must be bfloat16 or float16, got ", d.scalar_type());
      c.bf16 = d.scalar_type() == at::kBFloat16;
    } else {
      TORCH_CHECK(d.scalar_type() == at::kByte, "echokv attend: codes must be uint8, got ", d.scalar_type());
      const at::Tensor& s = tensors[3 * i + 1];
      const at::Tensor& z = tensors[3 * i + 2];
      c.chan = s.dim() == 4;
      TORCH_CHECK(!c.chan || std::string(what) == "key", "echokv attend: ", what,
                  " classes have a scale per token (per channel only for keys)");
      const int64_t rows = (T + BT - 1) / BT;
      for (const at::Tensor* x : {&s, &z}) {
        const bool ok = c.chan ? x->dim() == 4 && x->size(2) == rows && x->size(3) == c.n && x->stride(3) == 1
                               : x->dim() == 3 && x->size(2) == T;
        TORCH_CHECK(ok && x->size(0) == B && x->size(1) == H && x->scalar_type() == at::kHalf,
                    "echokv attend: scale and zero must be float16 [B, H, T] (per token) or [B, H, ceil(T / ", BT,
                    "), n] (per channel and block), got ", x->sizes(), " ", x->scalar_type());
      }
      c.s = s.data_ptr<at::Half>();
      c.z = z.data_ptr<at::Half>();
      c.sb = s.stride(0), c.sh = s.stride(1), c.st = s.stride(2);
      c.zb = z.stride(0), c.zh = z.stride(1), c.zt = z.stride(2);
    }
    const int64_t es = d.element_size();
    c.data = static_cast<const uint8_t*>(d.data_ptr());
    c.db = d.stride(0) * es, c.dh = d.stride(1) * es, c.dt = d.stride(2) * es;
    c.npad = c.width == 4 ? (c.n + 31) / 32 * 32 : (c.n + 15) / 16 * 16;
    c.off = off;
    c.poff = poff;
    off += c.n;
    poff += c.npad;
    out.push_back(c);
  }
  return out;
}

int64_t infer_t(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta, int64_t fallback) {
  for (size_t i = 0; i < meta.size() / 2; ++i)
    if (meta[2 * i + 1] > 0 && tensors[3 * i].dim() == 4) return tensors[3 * i].size(2);
  return fallback;
}

// The stored part's partials: per (b, h, split) item and row, the running max, the sum of exps and the unnormalised
// output in the value basis (natural channel order). S == 0: nothing to merge (no row or no token).
struct Partials {
  int64_t B = 0, H = 0, R = 0, S = 0;
  int nv = 0;
  std::vector<float> pm, pl, pacc;
};

// The split, online-softmax pass over the stored tokens (the arguments of attend below).
Partials stored_partials(const at::Tensor& q, const std::vector<at::Tensor>& k_tensors,
                         const std::vector<int64_t>& k_meta, const std::vector<at::Tensor>& v_tensors,
                         const std::vector<int64_t>& v_meta, const std::optional<at::Tensor>& mask, int64_t splits,
                         const std::optional<at::Tensor>& table = std::nullopt) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "echokv attend: q must be a contiguous float32 [B, H, R, d] tensor");
  TORCH_CHECK(q.device().is_cpu(), "echokv attend: the C++ kernel runs on CPU tensors");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), dq = q.size(3);
  int64_t T = infer_t(k_tensors, k_meta, infer_t(v_tensors, v_meta, -1));
  TORCH_CHECK(T >= 0, "echokv attend: no stored class to attend over");
  // Paged (a serving engine's pages): the stored tensors hold blocks of BT tokens, [P, H, BT, *] (per-channel
  // scales [P, H, 1, n]), and row b's block j is block table[b, j] of them.
  const int64_t* tp = nullptr;
  int64_t tstride = 0, SB = B;
  if (table.has_value() && table->defined()) {
    TORCH_CHECK(table->dim() == 2 && table->size(0) == B && table->scalar_type() == at::kLong &&
                    table->stride(1) == 1 && table->device().is_cpu(),
                "echokv attend: table must be int64 [B, blocks] = [", B, ", blocks], got ", table->sizes());
    TORCH_CHECK(T == BT, "echokv attend: paged classes hold blocks of ", BT, " tokens, got ", T);
    for (size_t i = 0; i < k_meta.size() / 2; ++i)
      if (k_meta[2 * i + 1] > 0) SB = k_tensors[3 * i].size(0);
    tp = table->data_ptr<int64_t>();
    tstride = table->stride(0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < table->size(1); ++j)
        TORCH_CHECK(tp[b * tstride + j] >= 0 && tp[b * tstride + j] < SB, "echokv attend: table entry ",
                    tp[b * tstride + j], " is not one of the ", SB, " stored blocks");
  }
  std::vector<Cls> vc = parse_classes(v_tensors, v_meta, SB, H, T, "value");
#ifdef ECHOKV_INT_VALUES
  for (Cls& c : vc) c.ints = c.width != 16;  // summed with 16-bit fixed-point weights, in channel order
#endif
  std::vector<Cls> kc = parse_classes(k_tensors, k_meta, SB, H, T, "key");
  if (tp) T = table->size(1) * BT;
  const int kept_k = kc.empty() ? 0 : kc.back().off + kc.back().n;
  const int nv = vc.empty() ? 0 : vc.back().off + vc.back().n;
  // Key classes scored on their integer codes (VNNI, AVX2) leave the float scratch layout; the others are packed in it.
  // Per-channel ones share one widened row and one rounded query (one dot per token); per-token ones dot alone.
  int kflt = 0, tlanes = 32, glanes = 0;
  std::vector<int> ik, gk;  // integer classes: per token, per channel
  for (size_t ci = 0; ci < kc.size(); ++ci) {
    Cls& c = kc[ci];
#ifdef ECHOKV_INT_KEYS
    if (c.width != 16) {
      c.ints = true;
      c.nvec = (c.n + 31) / 32;
      if (c.chan) {
        c.loff = glanes;
        glanes += c.n;
        gk.push_back(static_cast<int>(ci));
      } else {
        tlanes = std::max(tlanes, 32 * c.nvec);
        ik.push_back(static_cast<int>(ci));
      }
      continue;
    }
#endif
    c.foff = kflt;
    kflt += c.n;
  }
  const int kpad = (kflt + 15) / 16 * 16;  // the compact float key layout, zero past kflt
  const int vpad = vc.empty() ? 0 : vc.back().poff + vc.back().npad;
  TORCH_CHECK(dq >= kept_k, "echokv attend: q has ", dq, " channels, the keys keep ", kept_k);
  const uint8_t* mp = nullptr;
  int64_t mb = 0, mt = 0;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == T && mask->scalar_type() == at::kBool,
                "echokv attend: mask must be bool [B, T] = [", B, ", ", T, "], got ", mask->sizes());
    mp = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
    mb = mask->stride(0), mt = mask->stride(1);
  }

  Partials P;
  P.B = B, P.H = H, P.R = R, P.nv = nv;
  const int64_t nblocks = (T + BT - 1) / BT;
  if (B * H * R == 0 || nblocks == 0) return P;

  // Splits per (b, h): the fewest that give every thread an equal share of items (more only when asked).
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t S = splits;
  if (S <= 0) {
    S = 1;
    while (S < nblocks && ((B * H * S) % nth != 0 || B * H * S < nth)) ++S;
  }
  const int64_t items = B * H * S;
  // Partials: running max, sum of exps and unnormalised output, per item and row.
  std::vector<float> pm(items * R, NEG_INF), pl(items * R, 0.0f), pacc(items * R * std::max(nv, 1), 0.0f);
  const float* qp = q.data_ptr<float>();

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qperm(R * std::max(kpad, 1), 0.0f), qblk(R * std::max(kpad, 1), 0.0f), bias(R);
    const std::vector<float> ones(BT, 1.0f), zeros(BT, 0.0f);
    bool chan = false;  // per-channel key classes: their scales fold into a per-block query, their zeros into a bias
    for (const Cls& c : kc) chan |= c.chan && !c.ints;
#ifdef ECHOKV_INT_KEYS
    // integer classes: widened codes (ROWPAD lanes past the longest row, so that a tail's full-width store stays
    // in its row), the rounded queries (per token: once per item), scales in channel order
    const int gvec = (glanes + 31) / 32, lmax = std::max(32 * gvec, tlanes);
    std::vector<int16_t> kb16(BT * (lmax + ROWPAD)), q16(R * ik.size() * tlanes), qg(std::max(32 * gvec, 32)),
        nat(lmax + 64);
    std::vector<int16_t> w16(R * BT);
    std::vector<float> wstep(R);
    std::vector<float> iscale(R * ik.size()), isum(R * ik.size()), idots(BT), isb(std::max<int64_t>(BT, dq) + 16),
        izb(std::max<int64_t>(BT, dq) + 16);
#endif
    int maxv = 16;
    for (const Cls& c : vc) maxv = std::max(maxv, c.npad);
    std::vector<float> kbuf(BT * std::max(kpad, 16), 0.0f), vbuf(BT * maxv, 0.0f), sc(R * BT), p(R * BT),
        w(R * BT);
    std::vector<float> sbuf(std::max(BT, kpad + 32)), zbuf(std::max(BT, kpad + 32)), acc(R * std::max(vpad, 1)), zacc(R * std::max<size_t>(vc.size(), 1));
    std::vector<float> m(R), l(R);
    std::vector<uint8_t> vis(BT);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (H * S), h = (item / S) % H, s = item % S;
      const int64_t blk0 = nblocks * s / S, blk1 = nblocks * (s + 1) / S;
      // The query in the keys' padded layout (zero on the padding).
      for (int64_t r = 0; r < R; ++r) {
        const float* qr = qp + ((b * H + h) * R + r) * dq;
        for (size_t ci = 0; ci < kc.size(); ++ci) {
          const Cls& c = kc[ci];
          if (c.ints) continue;
          float* dst = qperm.data() + r * kpad + c.foff;
          for (int i = 0; i < c.n; ++i) dst[compact_index(c, i)] = qr[c.off + i];
        }
#ifdef ECHOKV_INT_KEYS
        for (size_t j = 0; j < ik.size(); ++j) {
          const Cls& c = kc[ik[j]];
          const size_t at = r * ik.size() + j;
          iscale[at] = query_max(c, qr + c.off, nullptr) / 32767.0f;
          query16(c, qr + c.off, nullptr, iscale[at], nat.data(), q16.data() + at * tlanes);
          float sum = 0.0f;
          for (int i = 0; i < c.n; ++i) sum += qr[c.off + i];
          isum[at] = sum;
        }
#endif
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(zacc.begin(), zacc.end(), 0.0f);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t t0 = blk * BT;
        const int nt = static_cast<int>(std::min<int64_t>(BT, T - t0));
        // the stored tensors' (batch, token) of this block: paged, its own block of BT tokens
        const int64_t pb = tp ? tp[b * tstride + blk] : b, pt = tp ? 0 : t0;
        bool any = true, all = true;
        if (mp) {
          visibility(mp + b * mb + t0 * mt, mt, nt, vis.data(), any, all);
          if (!any) continue;  // left padding: the whole block is skipped
        }
        // Scores: all key classes dequantized into one scratch row per token, then one dot per row. A per-channel
        // class is widened as bare codes; q . (code * s + z) = (q * s) . code + q . z, with q * s and q . z taken once
        // per block (R * n products for 64 tokens) instead of a scale per channel in every token's widening.
        if (chan) {
          std::copy(qperm.begin(), qperm.end(), qblk.begin());
          std::fill(bias.begin(), bias.end(), 0.0f);
        }
        for (const Cls& c : kc) {
          if (c.ints) continue;
          if (c.chan) {
            load_sz_chan(c, pb, h, pt, sbuf.data(), zbuf.data());
            for (int64_t r = 0; r < R; ++r) {
              float* qb = qblk.data() + r * kpad + c.foff;
              bias[r] += scale_query(qb, sbuf.data(), zbuf.data(), c.n);
            }
            Cls bare = c;
            bare.chan = false;
            widen_block(bare, c.tok(pb, h, pt), c.dt, nt, ones.data(), zeros.data(), kbuf.data(), kpad);
            continue;
          }
          if (c.width != 16) load_sz(c, pb, h, pt, nt, sbuf.data(), zbuf.data());
          widen_block(c, c.tok(pb, h, pt), c.dt, nt, sbuf.data(), zbuf.data(), kbuf.data(), kpad);
        }
        for (int64_t r = 0; r < R; ++r) {
          float* sr = sc.data() + r * BT;
          if (kpad) dots(kbuf.data(), kpad, (chan ? qblk : qperm).data() + r * kpad, nt, sr);
          else std::fill(sr, sr + nt, 0.0f);
          if (chan)
            for (int t = 0; t < nt; ++t) sr[t] += bias[r];
        }
#ifdef ECHOKV_INT_KEYS
        if (!gk.empty()) {
          for (int ci : gk) {
            const Cls& c = kc[ci];
            widen16(c, c.tok(pb, h, pt), c.dt, nt, kb16.data() + c.loff, 32 * gvec + ROWPAD);
            load_sz_nat(c, pb, h, pt, isb.data() + c.off, izb.data() + c.off);
          }
          for (int64_t r = 0; r < R; ++r) {
            const float* qr = qp + ((b * H + h) * R + r) * dq;
            float mx = 0.0f, bias_r = 0.0f;
            for (int ci : gk) mx = std::max(mx, query_max(kc[ci], qr + kc[ci].off, isb.data() + kc[ci].off));
            const float scale = mx / 32767.0f;
            for (int ci : gk) {
              const Cls& c = kc[ci];
              query16(c, qr + c.off, isb.data() + c.off, scale, nat.data(), qg.data() + c.loff);
              bias_r += dotf(qr + c.off, izb.data() + c.off, c.n);
            }
            dots16(kb16.data(), qg.data(), gvec, nt, idots.data(), 32 * gvec + ROWPAD);
            float* sr = sc.data() + r * BT;
            for (int t = 0; t < nt; ++t) sr[t] += scale * idots[t] + bias_r;
          }
        }
        for (size_t j = 0; j < ik.size(); ++j) {
          const Cls& c = kc[ik[j]];
          widen16(c, c.tok(pb, h, pt), c.dt, nt, kb16.data(), 32 * c.nvec + ROWPAD);
          load_sz(c, pb, h, pt, nt, isb.data(), izb.data());
          for (int64_t r = 0; r < R; ++r) {
            const size_t at = r * ik.size() + j;
            dots16(kb16.data(), q16.data() + at * tlanes, c.nvec, nt, idots.data(), 32 * c.nvec + ROWPAD);
            const float scale = iscale[at], sum = isum[at];
            float* sr = sc.data() + r * BT;
            for (int t = 0; t < nt; ++t) sr[t] += scale * isb[t] * idots[t] + izb[t] * sum;
          }
        }
#endif
        if (!all)
          for (int64_t r = 0; r < R; ++r)
            for (int t = 0; t < nt; ++t)
              if (!vis[t]) sc[r * BT + t] = NEG_INF;
        // Online softmax: rescale what came before when the running max rises.
        for (int64_t r = 0; r < R; ++r) {
          float* sr = sc.data() + r * BT;
          float* pr = p.data() + r * BT;
          const float mn = std::max(m[r], block_max(sr, nt));
          if (mn == NEG_INF) {  // nothing visible for this row yet
            std::fill(pr, pr + nt, 0.0f);
            continue;
          }
          if (mn > m[r]) {
            const float alpha = exp_scalar(m[r] - mn);
            l[r] *= alpha;
            for (int i = 0; i < vpad; ++i) acc[r * vpad + i] *= alpha;
            for (size_t ci = 0; ci < vc.size(); ++ci) zacc[r * vc.size() + ci] *= alpha;
            m[r] = mn;
          }
          l[r] += exp_shift(sr, mn, nt, pr);
        }
        // Values.
        for (size_t ci = 0; ci < vc.size(); ++ci) {
          const Cls& c = vc[ci];
          const float* wp = p.data();
          if (c.width != 16) {
            load_sz(c, pb, h, pt, nt, sbuf.data(), zbuf.data());
            for (int64_t r = 0; r < R; ++r)
              zacc[r * vc.size() + ci] += value_weights(p.data() + r * BT, sbuf.data(), zbuf.data(), nt,
                                                        w.data() + r * BT);
#ifdef ECHOKV_INT_VALUES
            if (c.ints) {
              for (int64_t r = 0; r < R; ++r) wstep[r] = weights16(w.data() + r * BT, nt, w16.data() + r * BT);
              if (c.width == 8)
                vacc16<8>(c, c.tok(pb, h, pt), c.dt, nt, static_cast<int>(R), w16.data(), wstep.data(),
                          acc.data() + c.poff, vpad);
              else if (c.width == 4)
                vacc16<4>(c, c.tok(pb, h, pt), c.dt, nt, static_cast<int>(R), w16.data(), wstep.data(),
                          acc.data() + c.poff, vpad);
              else
                vacc16<2>(c, c.tok(pb, h, pt), c.dt, nt, static_cast<int>(R), w16.data(), wstep.data(),
                          acc.data() + c.poff, vpad);
              continue;
            }
#endif
            wp = w.data();
          }
          vacc(c, c.tok(pb, h, pt), c.dt, nt, static_cast<int>(R), wp, acc.data() + c.poff, vpad, vbuf.data());
        }
      }
      // The item's partial, in the natural channel order.
      for (int64_t r = 0; r < R; ++r) {
        pm[item * R + r] = m[r];
        pl[item * R + r] = l[r];
        float* dst = pacc.data() + (item * R + r) * nv;
        for (size_t ci = 0; ci < vc.size(); ++ci) {
          const Cls& c = vc[ci];
          const float za = zacc[r * vc.size() + ci];
          const float* src = acc.data() + r * vpad + c.poff;
          for (int i = 0; i < c.n; ++i) dst[c.off + i] = src[c.ints ? i : padded_index(c, i)] + za;
        }
      }
    }
  });

  P.S = S;
  P.pm = std::move(pm), P.pl = std::move(pl), P.pacc = std::move(pacc);
  return P;
}

}  // namespace

// q [B, H, R, dq] float32 contiguous; per class of keys (values): codes, scale, zero tensors (scale/zero undefined or
// empty for 16 bit) and (width, n) in meta, in the stored channel order; mask bool [B, T] or None; threads <= 0:
// at::get_num_threads(). Returns (out [B, H, R, n_v], lse [B, H, R]) float32.
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q, const std::vector<at::Tensor>& k_tensors,
                                          const std::vector<int64_t>& k_meta,
                                          const std::vector<at::Tensor>& v_tensors,
                                          const std::vector<int64_t>& v_meta,
                                          const std::optional<at::Tensor>& mask, int64_t splits) {
  const Partials P = stored_partials(q, k_tensors, k_meta, v_tensors, v_meta, mask, splits);
  const int64_t B = P.B, H = P.H, R = P.R, S = P.S;
  const int nv = P.nv;
  auto out = at::zeros({B, H, R, nv}, q.options());
  auto lse = at::full({B, H, R}, NEG_INF, q.options());
  if (S == 0) return {out, lse};
  const std::vector<float>& pm = P.pm;
  const std::vector<float>& pl = P.pl;
  const std::vector<float>& pacc = P.pacc;

  // Merge the splits by log-sum-exp.
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * H * R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / R, r = i % R;
      float M = NEG_INF;
      for (int64_t s = 0; s < S; ++s) M = std::max(M, pm[(bh * S + s) * R + r]);
      if (M == NEG_INF) continue;  // no visible token: out 0, lse -inf
      float L = 0.0f;
      float* o = op + i * nv;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = (bh * S + s) * R + r;
        if (pm[k] == NEG_INF) continue;
        const float f = std::exp(pm[k] - M);
        L += pl[k] * f;
        const float* a = pacc.data() + k * nv;
        for (int c = 0; c < nv; ++c) o[c] += f * a[c];
      }
      const float inv = 1.0f / L;
      for (int c = 0; c < nv; ++c) o[c] *= inv;
      lp[i] = M + std::log(L);
    }
  });
  return {out, lse};
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Exact (recent) tokens: rows of d channels, bfloat16, float16 or float32
// ---------------------------------------------------------------------------------------------------------------

enum class Row { F32, BF16, F16 };

Row row_type(const at::Tensor& x, const char* what) {
  switch (x.scalar_type()) {
    case at::kFloat: return Row::F32;
    case at::kBFloat16: return Row::BF16;
    case at::kHalf: return Row::F16;
    default: TORCH_CHECK(false, "echokv attend_merged: ", what, " must be bfloat16, float16 or float32, got ",
                         x.scalar_type());
  }
  return Row::F32;
}

#ifdef ECHOKV_AVX512
inline __m512 load_row(const void* p, Row t, int i, __mmask16 k) {
  if (t == Row::F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  const __m256i x = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i);
  if (t == Row::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  return _mm512_cvtph_ps(x);
}
#elif defined(ECHOKV_AVX2)
// Channels [i, i + 8) of a row (m of them left; zero past them).
inline __m256 load_row8(const void* p, Row t, int i, int m) {
  if (t == Row::F32) return load8f(static_cast<const float*>(p) + i, m);
  const uint8_t* b = static_cast<const uint8_t*>(p) + 2 * i;
  const __m128i x = m >= 8 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)) : load_partial(b, 2 * m);
  if (t == Row::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  return _mm256_cvtph_ps(x);
}
#endif

inline float row_at(const void* p, Row t, int i) {
  if (t == Row::F32) return static_cast<const float*>(p)[i];
  if (t == Row::BF16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  return static_cast<float>(static_cast<const at::Half*>(p)[i]);
}

// q . x over d channels.
float row_dot(const float* q, const void* x, Row t, int d) {
#ifdef ECHOKV_AVX512
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < d; i += 16) {
    const __mmask16 k = lanes(d - i);
    a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, q + i), load_row(x, t, i, k), a);
  }
  return _mm512_reduce_add_ps(a);
#elif defined(ECHOKV_AVX2)
  __m256 a = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8) {
    a = _mm256_fmadd_ps(load8f(q + i, d - i), load_row8(x, t, i, d - i), a);
  }
  return reduce_add8(a);
#else
  float a = 0.0f;
  for (int i = 0; i < d; ++i) a += q[i] * row_at(x, t, i);
  return a;
#endif
}

// acc += w * x over d channels.
void row_axpy(float w, const void* x, Row t, int d, float* acc) {
#ifdef ECHOKV_AVX512
  const __m512 wv = _mm512_set1_ps(w);
  for (int i = 0; i < d; i += 16) {
    const __mmask16 k = lanes(d - i);
    _mm512_mask_storeu_ps(acc + i, k, _mm512_fmadd_ps(wv, load_row(x, t, i, k), _mm512_maskz_loadu_ps(k, acc + i)));
  }
#elif defined(ECHOKV_AVX2)
  const __m256 wv = _mm256_set1_ps(w);
  for (int i = 0; i < d; i += 8) {
    store8f(acc + i, _mm256_fmadd_ps(wv, load_row8(x, t, i, d - i), load8f(acc + i, d - i)), d - i);
  }
#else
  for (int i = 0; i < d; ++i) acc[i] += w * row_at(x, t, i);
#endif
}

}  // namespace

// The stored tokens (as attend: q_basis, the classes, mask) merged with Te exact tokens into the head's output:
// stored scores are q_basis . key + mean_score[b, h, r], their values value_components @ v_dec[h] + v_mean[h];
// exact scores q_exact . exact_k[b, h, e], their values exact_v[b, h, e], visible where exact_mask ([B, Te] or
// per row [B, R, Te]; None: all). One softmax over every visible score; a row that sees nothing gets 0.
// q_exact [B, H, R, d] and mean_score [B, H, R] float32 contiguous; exact_k/v [B, H, Te, d] bfloat16, float16 or
// float32, any strides but the last; v_dec [H, n_v, d], v_mean [H, d] float32 contiguous. Returns out [B, H, R, d]
// float32.
namespace {

// attend_merged over two segments of exact tokens, (sink_k, sink_v) then (exact_k, exact_v), in that order for
// exact_mask (sink_k undefined: none).
at::Tensor merged_impl(const at::Tensor& q_basis, const at::Tensor& q_exact, const at::Tensor& mean_score,
                       const std::vector<at::Tensor>& k_tensors, const std::vector<int64_t>& k_meta,
                       const std::vector<at::Tensor>& v_tensors, const std::vector<int64_t>& v_meta,
                       const std::optional<at::Tensor>& mask, const at::Tensor& sink_k, const at::Tensor& sink_v,
                       const at::Tensor& exact_k, const at::Tensor& exact_v,
                       const std::optional<at::Tensor>& exact_mask, const at::Tensor& v_dec,
                       const at::Tensor& v_mean, int64_t splits,
                       const std::optional<at::Tensor>& table = std::nullopt) {
  TORCH_CHECK(q_basis.dim() == 4, "echokv attend_merged: q_basis must be [B, H, R, n]");
  const int64_t B = q_basis.size(0), H = q_basis.size(1), R = q_basis.size(2);
  TORCH_CHECK(q_exact.dim() == 4 && q_exact.size(0) == B && q_exact.size(1) == H && q_exact.size(2) == R &&
                  q_exact.scalar_type() == at::kFloat && q_exact.is_contiguous(),
              "echokv attend_merged: q_exact must be a contiguous float32 [B, H, R, d] = [", B, ", ", H, ", ", R,
              ", d] tensor, got ", q_exact.sizes());
  const int64_t d = q_exact.size(3);
  TORCH_CHECK(mean_score.dim() == 3 && mean_score.size(0) == B && mean_score.size(1) == H &&
                  mean_score.size(2) == R && mean_score.scalar_type() == at::kFloat && mean_score.is_contiguous(),
              "echokv attend_merged: mean_score must be a contiguous float32 [B, H, R] tensor, got ",
              mean_score.sizes());
  TORCH_CHECK(exact_k.dim() == 4 && exact_v.dim() == 4 && exact_k.sizes() == exact_v.sizes() &&
                  exact_k.size(0) == B && exact_k.size(1) == H && exact_k.size(3) == d,
              "echokv attend_merged: exact_k and exact_v must be [B, H, Te, d] = [", B, ", ", H, ", Te, ", d,
              "], got ", exact_k.sizes(), " and ", exact_v.sizes());
  const int64_t Tr = exact_k.size(2);
  TORCH_CHECK(d <= 1 || Tr == 0 || (exact_k.stride(3) == 1 && exact_v.stride(3) == 1),
              "echokv attend_merged: the last dimension of exact_k and exact_v must be contiguous");
  const bool sinks = sink_k.defined() && sink_k.numel() > 0;
  if (sinks) {
    TORCH_CHECK(sink_k.dim() == 4 && sink_v.dim() == 4 && sink_k.sizes() == sink_v.sizes() && sink_k.size(0) == B &&
                    sink_k.size(1) == H && sink_k.size(3) == d && sink_k.scalar_type() == exact_k.scalar_type() &&
                    sink_v.scalar_type() == exact_v.scalar_type() && sink_k.stride(3) == 1 && sink_v.stride(3) == 1 &&
                    sink_k.device().is_cpu() && sink_v.device().is_cpu(),
                "echokv attend_merged: sink_k and sink_v must be [B, H, Ts, d] = [", B, ", ", H, ", Ts, ", d,
                "] CPU tensors of exact_k's and exact_v's dtypes, contiguous in the last dimension, got ",
                sink_k.sizes(), " and ", sink_v.sizes());
  }
  const int64_t Ts = sinks ? sink_k.size(2) : 0, Te = Ts + Tr;
  TORCH_CHECK(exact_k.device().is_cpu() && exact_v.device().is_cpu() && v_dec.device().is_cpu() &&
                  v_mean.device().is_cpu(), "echokv attend_merged: the C++ kernel runs on CPU tensors");
  const Row kt = row_type(exact_k, "exact_k"), vt = row_type(exact_v, "exact_v");
  const uint8_t* emp = nullptr;
  int64_t emb = 0, emr = 0, eme = 0;
  if (exact_mask.has_value() && exact_mask->defined()) {
    const at::Tensor& m = *exact_mask;
    const bool ok2 = m.dim() == 2 && m.size(0) == B && m.size(1) == Te;
    const bool ok3 = m.dim() == 3 && m.size(0) == B && m.size(1) == R && m.size(2) == Te;
    TORCH_CHECK((ok2 || ok3) && m.scalar_type() == at::kBool,
                "echokv attend_merged: exact_mask must be bool [B, Te] = [", B, ", ", Te, "] or [B, R, Te], got ",
                m.sizes());
    emp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    emb = m.stride(0);
    emr = ok3 ? m.stride(1) : 0;
    eme = m.stride(m.dim() - 1);
  }

  const Partials P = stored_partials(q_basis, k_tensors, k_meta, v_tensors, v_meta, mask, splits, table);
  const int64_t S = P.S;
  const int nv = P.nv;
  TORCH_CHECK(v_dec.dim() == 3 && v_dec.size(0) == H && v_dec.size(1) == nv && v_dec.size(2) == d &&
                  v_dec.scalar_type() == at::kFloat && v_dec.is_contiguous(),
              "echokv attend_merged: v_dec must be a contiguous float32 [H, n_v, d] = [", H, ", ", nv, ", ", d,
              "] tensor, got ", v_dec.sizes());
  TORCH_CHECK(v_mean.dim() == 2 && v_mean.size(0) == H && v_mean.size(1) == d &&
                  v_mean.scalar_type() == at::kFloat && v_mean.is_contiguous(),
              "echokv attend_merged: v_mean must be a contiguous float32 [H, d] tensor, got ", v_mean.sizes());

  auto out = at::empty({B, H, R, d}, q_exact.options());
  if (B * H * R == 0 || d == 0) return out;
  float* op = out.data_ptr<float>();
  const float* qp = q_exact.data_ptr<float>();
  const float* msp = mean_score.data_ptr<float>();
  const float* vdp = v_dec.data_ptr<float>();
  const float* vmp = v_mean.data_ptr<float>();
  const uint8_t* kp = static_cast<const uint8_t*>(exact_k.data_ptr());
  const uint8_t* vp = static_cast<const uint8_t*>(exact_v.data_ptr());
  const int64_t kes = exact_k.element_size(), ves = exact_v.element_size();
  const int64_t kb = exact_k.stride(0) * kes, kh = exact_k.stride(1) * kes, ke = exact_k.stride(2) * kes;
  const int64_t vb = exact_v.stride(0) * ves, vh = exact_v.stride(1) * ves, ve = exact_v.stride(2) * ves;
  const uint8_t* skp = sinks ? static_cast<const uint8_t*>(sink_k.data_ptr()) : nullptr;
  const uint8_t* svp = sinks ? static_cast<const uint8_t*>(sink_v.data_ptr()) : nullptr;
  const int64_t skb = sinks ? sink_k.stride(0) * kes : 0, skh = sinks ? sink_k.stride(1) * kes : 0,
                ske = sinks ? sink_k.stride(2) * kes : 0;
  const int64_t svb = sinks ? sink_v.stride(0) * ves : 0, svh = sinks ? sink_v.stride(1) * ves : 0,
                sve = sinks ? sink_v.stride(2) * ves : 0;
  // exact token t of (b, h): a sink for t < Ts, else recent token t - Ts
  auto key_at = [&](int64_t b, int64_t h, int64_t t) -> const void* {
    return t < Ts ? skp + b * skb + h * skh + t * ske : kp + b * kb + h * kh + (t - Ts) * ke;
  };
  auto value_at = [&](int64_t b, int64_t h, int64_t t) -> const void* {
    return t < Ts ? svp + b * svb + h * svh + t * sve : vp + b * vb + h * vh + (t - Ts) * ve;
  };
  const int di = static_cast<int>(d);

  // Per row: merge the splits, then the exact tokens; map the stored part to the head (one [n_v] x [n_v, d]
  // product); small rows run inline rather than waking the threads.
  const int64_t cost = S * nv + int64_t(nv) * d + 2 * Te * d + 64;
  const int64_t grain = std::max<int64_t>(1, 32768 / cost);
  at::parallel_for(0, B * H * R, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> o(std::max(nv, 1)), e(std::max<int64_t>(Te, 1)), acc(d);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / R, r = i % R, b = bh / H, h = bh % H;
      // the stored part: max Ms (with the key mean's score), sum of exps Ls relative to it, components o
      float Ms = NEG_INF, Ls = 0.0f;
      if (S > 0) {
        float M = NEG_INF;
        for (int64_t s = 0; s < S; ++s) M = std::max(M, P.pm[(bh * S + s) * R + r]);
        if (M != NEG_INF) {
          std::fill(o.begin(), o.end(), 0.0f);
          for (int64_t s = 0; s < S; ++s) {
            const int64_t k = (bh * S + s) * R + r;
            if (P.pm[k] == NEG_INF) continue;
            const float f = std::exp(P.pm[k] - M);
            Ls += P.pl[k] * f;
            const float* a = P.pacc.data() + k * nv;
            for (int c = 0; c < nv; ++c) o[c] += f * a[c];
          }
          Ms = M + msp[i];
        }
      }
      // the exact tokens' scores
      const float* qr = qp + i * d;
      float Mx = Ms;
      for (int64_t t = 0; t < Te; ++t) {
        if (emp && !emp[b * emb + r * emr + t * eme]) {
          e[t] = NEG_INF;
          continue;
        }
        e[t] = row_dot(qr, key_at(b, h, t), kt, di);
        Mx = std::max(Mx, e[t]);
      }
      float* orow = op + i * d;
      if (Mx == NEG_INF) {  // nothing visible
        std::fill(orow, orow + d, 0.0f);
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float L = 0.0f;
      if (Ms != NEG_INF) {
        const float fs = std::exp(Ms - Mx);
        L = fs * Ls;
        const float* vd = vdp + h * nv * d;
        for (int c = 0; c < nv; ++c) row_axpy(fs * o[c], vd + c * d, Row::F32, di, acc.data());
        row_axpy(L, vmp + h * d, Row::F32, di, acc.data());
      }
      for (int64_t t = 0; t < Te; ++t) {
        if (e[t] == NEG_INF) continue;
        const float w = std::exp(e[t] - Mx);
        L += w;
        row_axpy(w, value_at(b, h, t), vt, di, acc.data());
      }
      const float inv = 1.0f / L;
      for (int64_t c = 0; c < d; ++c) orow[c] = acc[c] * inv;
    }
  });
  return out;
}

}  // namespace

at::Tensor attend_merged(const at::Tensor& q_basis, const at::Tensor& q_exact, const at::Tensor& mean_score,
                         const std::vector<at::Tensor>& k_tensors, const std::vector<int64_t>& k_meta,
                         const std::vector<at::Tensor>& v_tensors, const std::vector<int64_t>& v_meta,
                         const std::optional<at::Tensor>& mask, const at::Tensor& exact_k, const at::Tensor& exact_v,
                         const std::optional<at::Tensor>& exact_mask, const at::Tensor& v_dec,
                         const at::Tensor& v_mean, int64_t splits) {
  return merged_impl(q_basis, q_exact, mean_score, k_tensors, k_meta, v_tensors, v_meta, mask, at::Tensor(),
                     at::Tensor(), exact_k, exact_v, exact_mask, v_dec, v_mean, splits);
}

// A decode step of EchoKV-Q's read path in one call: q [B, H, R, d] (the model's query, its query heads grouped by
// KV head; bfloat16, float16 or float32, any strides but the last) times `scaling`, folded into the key basis
// (k_basis [H, d, n_k]) and the key mean's score (k_mean [H, d]), then attend_merged over the stored classes and
// the exact tokens (sink_k/sink_v [B, H, Ts, d], possibly empty, then exact_k/exact_v, in that order for
// exact_mask). Returns out [B, H, R, d] in q's dtype.
at::Tensor attend_step(const at::Tensor& q, double scaling, const at::Tensor& k_basis, const at::Tensor& k_mean,
                       const std::vector<at::Tensor>& k_tensors, const std::vector<int64_t>& k_meta,
                       const std::vector<at::Tensor>& v_tensors, const std::vector<int64_t>& v_meta,
                       const std::optional<at::Tensor>& mask, const at::Tensor& sink_k, const at::Tensor& sink_v,
                       const at::Tensor& exact_k, const at::Tensor& exact_v,
                       const std::optional<at::Tensor>& exact_mask, const at::Tensor& v_dec,
                       const at::Tensor& v_mean, int64_t splits, const std::optional<at::Tensor>& table) {
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu() && (q.size(3) <= 1 || q.stride(3) == 1),
              "echokv attend_step: q must be a CPU [B, H, R, d] tensor, contiguous in the last dimension, got ",
              q.sizes());
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), d = q.size(3);
  TORCH_CHECK(k_basis.dim() == 3 && k_basis.size(0) == H && k_basis.size(1) == d &&
                  k_basis.scalar_type() == at::kFloat && k_basis.is_contiguous(),
              "echokv attend_step: k_basis must be a contiguous float32 [H, d, n_k] = [", H, ", ", d,
              ", n_k] tensor, got ", k_basis.sizes());
  TORCH_CHECK(k_mean.dim() == 2 && k_mean.size(0) == H && k_mean.size(1) == d &&
                  k_mean.scalar_type() == at::kFloat && k_mean.is_contiguous(),
              "echokv attend_step: k_mean must be a contiguous float32 [H, d] tensor, got ", k_mean.sizes());
  const int64_t nk = k_basis.size(2);
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor qe = at::empty({B, H, R, d}, fopt), qb = at::empty({B, H, R, nk}, fopt), ms = at::empty({B, H, R}, fopt);
  const at::Tensor qf = q.to(at::kFloat);  // a no-op for float32
  const float s = static_cast<float>(scaling);
  const float* kbp = k_basis.data_ptr<float>();
  const float* kmp = k_mean.data_ptr<float>();
  float* qep = qe.data_ptr<float>();
  float* qbp = qb.data_ptr<float>();
  float* msp = ms.data_ptr<float>();
  const float* qp = qf.data_ptr<float>();
  const int64_t sb = qf.stride(0), sh = qf.stride(1), sr = qf.stride(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = (b * H + h) * R + r;
        float* e = qep + i * d;
        const float* src = qp + b * sb + h * sh + r * sr;
        for (int64_t c = 0; c < d; ++c) e[c] = src[c] * s;
        float* o = qbp + i * nk;
        std::fill(o, o + nk, 0.0f);
        float m = 0.0f;
        const float* basis = kbp + h * d * nk;
        for (int64_t c = 0; c < d; ++c) {
          const float x = e[c];
          const float* row = basis + c * nk;
          for (int64_t j = 0; j < nk; ++j) o[j] += x * row[j];
          m += x * kmp[h * d + c];
        }
        msp[i] = m;
      }
  at::Tensor out = merged_impl(qb, qe, ms, k_tensors, k_meta, v_tensors, v_meta, mask, sink_k, sink_v, exact_k,
                               exact_v, exact_mask, v_dec, v_mean, splits, table);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// A full-mode decode step in one call: q [B, H, R, d] (any float dtype and strides) times `scaling` over the 16-bit
// key and value [B, H, T, d] (contiguous in the last dimension), mask bool [B, T] or None. Out [B, H, R, d] in
// q's dtype (attend with one 16-bit class, without the PyTorch calls around it).
at::Tensor attend_full(const at::Tensor& q, double scaling, const at::Tensor& key, const at::Tensor& value,
                       const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && key.dim() == 4, "echokv attend_full: q and key must be [B, H, R, d] and [B, H, T, d]");
  const at::Tensor qf = (q.to(at::kFloat) * scaling).contiguous();
  const at::Tensor none = at::empty({0}, key.options().dtype(at::kHalf));
  const std::vector<int64_t> meta = {16, key.size(3)};
  const auto res = attend(qf, {key, none, none}, meta, {value, none, none}, {16, value.size(3)}, mask, 0);
  const at::Tensor& out = std::get<0>(res);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------------
// Encoding: one class of a block of tokens to codes, float16 scale and zero (reference.quantize_class and
// quantize_channels, bit for bit): a decode step that completes a block encodes every layer, and ~30 PyTorch calls
// per class cost more there than the attention of the step.
// ---------------------------------------------------------------------------------------------------------------
namespace {

uint16_t half_bits(float x) { return c10::Half(x).x; }
float half_value(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// x rounded to float16 towards +inf (up) or -inf, so that the result bounds x (quantize.round_fp16).
uint16_t round_half(float x, bool up) {
  const float c = std::min(std::max(x, -65504.0f), 65504.0f);
  uint16_t h = half_bits(c);
  const float v = half_value(h);
  if (up ? v < x : v > x) {  // one step towards the bound (IEEE nextafter on the float16 bits)
    const bool neg = h & 0x8000u, zero = (h & 0x7FFFu) == 0;
    if (up) h = zero ? 0x0001u : neg ? h - 1 : h + 1;
    else h = zero ? 0x8001u : neg ? h + 1 : h - 1;
  }
  return h;
}

}  // namespace

// z [B, H, T, n] float32 (the last dimension contiguous) -> (codes uint8 [B, H, T, n * width / 8], scale, zero
// float16): per_channel, one scale and zero per channel and block of BT tokens ([B, H, ceil(T / BT), n]; the first
// `skip` tokens do not count in their block's range), else one per token ([B, H, T]).
std::vector<at::Tensor> quantize(const at::Tensor& z, int64_t width, bool per_channel, int64_t skip) {
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == at::kFloat && z.device().is_cpu() && (z.size(3) <= 1 || z.stride(3) == 1),
              "echokv quantize: z must be a CPU float32 [B, H, T, n] tensor, contiguous in the last dimension, got ",
              z.sizes());
  TORCH_CHECK(width == 8 || width == 4 || width == 2, "echokv quantize: width must be 8, 4 or 2, got ", width);
  const int64_t B = z.size(0), H = z.size(1), T = z.size(2), n = z.size(3), per = 8 / width;
  TORCH_CHECK(n % per == 0, "echokv quantize: a ", width, "-bit class needs a multiple of ", per, " channels, got ", n);
  const float levels = static_cast<float>((1 << width) - 1);
  const int64_t rows = per_channel ? (T + BT - 1) / BT : T;
  auto codes = at::zeros({B, H, T, n / per}, z.options().dtype(at::kByte));
  auto scale = at::empty(per_channel ? std::vector<int64_t>{B, H, rows, n} : std::vector<int64_t>{B, H, T},
                         z.options().dtype(at::kHalf));
  auto zero = at::empty_like(scale);
  const float* zp = z.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>());
  uint16_t* op = reinterpret_cast<uint16_t*>(zero.data_ptr<at::Half>());
  const int64_t s0 = z.stride(0), s1 = z.stride(1), s2 = z.stride(2);
  std::vector<float> lo(n), hi(n), sf(n), zf(n);
  auto put = [&](int64_t bh, int64_t t, int64_t c, float x, float zz, float ss) {
    const float q = std::min(std::max(std::nearbyint((x - zz) / ss), 0.0f), levels);  // ties to even, as round_()
    cp[(bh * T + t) * (n / per) + c / per] |= static_cast<uint8_t>(static_cast<int>(q) << (width * (c % per)));
  };
  auto bounds = [&](float l, float h, uint16_t& zb, uint16_t& sb) {
    zb = round_half(l, false);
    sb = round_half((h - half_value(zb)) / levels, true);
    if (half_value(sb) == 0.0f) sb = half_bits(1.0f);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      const float* base = zp + b * s0 + h * s1;
      if (!per_channel) {
        for (int64_t t = 0; t < T; ++t) {
          const float* x = base + t * s2;
          float l = x[0], u = x[0];
          for (int64_t c = 1; c < n; ++c) l = std::min(l, x[c]), u = std::max(u, x[c]);
          uint16_t zb, sb;
          bounds(l, u, zb, sb);
          sp[bh * T + t] = sb, op[bh * T + t] = zb;
          const float zz = half_value(zb), ss = half_value(sb);
          for (int64_t c = 0; c < n; ++c) put(bh, t, c, x[c], zz, ss);
        }
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t last = std::min((r + 1) * BT, T), first = std::max(r * BT, std::min(skip, last));
        for (int64_t c = 0; c < n; ++c) lo[c] = first < last ? base[first * s2 + c] : 0.0f, hi[c] = lo[c];
        for (int64_t t = first + 1; t < last; ++t)
          for (int64_t c = 0; c < n; ++c) {
            const float x = base[t * s2 + c];
            lo[c] = std::min(lo[c], x), hi[c] = std::max(hi[c], x);
          }
        for (int64_t c = 0; c < n; ++c) {
          uint16_t zb, sb;
          bounds(lo[c], hi[c], zb, sb);
          sp[(bh * rows + r) * n + c] = sb, op[(bh * rows + r) * n + c] = zb;
          zf[c] = half_value(zb), sf[c] = half_value(sb);
        }
        for (int64_t t = r * BT; t < last; ++t)
          for (int64_t c = 0; c < n; ++c) put(bh, t, c, base[t * s2 + c], zf[c], sf[c]);
      }
    }
  return {codes, scale, zero};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "echokv fused decode attention over per-head coded K/V (see echokv/kernels/reference.py)",
        py::arg("q"), py::arg("k_tensors"), py::arg("k_meta"), py::arg("v_tensors"), py::arg("v_meta"),
        py::arg("mask") = py::none(), py::arg("splits") = 0);
  m.def("attend_merged", &attend_merged,
        "echokv decode attention: the stored tokens merged with exact ones, in the head's space (one call)",
        py::arg("q_basis"), py::arg("q_exact"), py::arg("mean_score"), py::arg("k_tensors"), py::arg("k_meta"),
        py::arg("v_tensors"), py::arg("v_meta"), py::arg("mask"), py::arg("exact_k"), py::arg("exact_v"),
        py::arg("exact_mask"), py::arg("v_dec"), py::arg("v_mean"), py::arg("splits") = 0);
  m.def("attend_step", &attend_step,
        "echokv decode attention of one step: the query folded into the key basis, the stored tokens and the exact "
        "ones (sinks, then recent) merged, out in q's dtype",
        py::arg("q"), py::arg("scaling"), py::arg("k_basis"), py::arg("k_mean"), py::arg("k_tensors"),
        py::arg("k_meta"), py::arg("v_tensors"), py::arg("v_meta"), py::arg("mask"), py::arg("sink_k"),
        py::arg("sink_v"), py::arg("exact_k"), py::arg("exact_v"), py::arg("exact_mask"), py::arg("v_dec"),
        py::arg("v_mean"), py::arg("splits") = 0, py::arg("table") = py::none());
  m.def("quantize", &quantize,
        "echokv encoding of one class: codes (packed), float16 scale and zero, per token or per channel and block",
        py::arg("z"), py::arg("width"), py::arg("per_channel"), py::arg("skip") = 0);
  m.def("attend_full", &attend_full, "echokv full-mode decode attention over 16-bit K/V, out in q's dtype",
        py::arg("q"), py::arg("scaling"), py::arg("key"), py::arg("value"), py::arg("mask") = py::none());
  m.def("fixed_point", []() {  // bits of the query on quantized key classes (0: float; reference.attend)
#ifdef ECHOKV_INT_KEYS
    return 16;
#else
    return 0;
#endif
  });
  m.def("fixed_point_values", []() {  // bits of the softmax weights on quantized value classes (0: float)
#ifdef ECHOKV_INT_VALUES
    return 16;
#else
    return 0;
#endif
  });
  m.def("simd", []() {
#if defined(ECHOKV_VNNI)
    return std::string("avx512-vnni");
#elif defined(ECHOKV_AVX512)
    return std::string("avx512");
#elif defined(ECHOKV_AVX2)
    return std::string("avx2");
#else
    return std::string("portable");
#endif
  });
}
