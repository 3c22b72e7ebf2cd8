// AVX2 + FMA + F16C path for f32 and the K-quants (Q8_0/Q4_0/Q4_1: kernels_idot_avx2.cc). Two drivers
// share one per-output recipe, so they give the same bits:
//  - fused (M <= 4 rows): unpack weight blocks into registers, each used for every row at once;
//  - panel (more rows): unpack a column into a float scratch once per row block, then tiles of rows.
// Either way y[r, n] = hsum(acc0 + acc1) (+ offset term), where acc_{t mod 2} = fma(x[8t:8t+8],
// w[8t:8t+8], acc_{t mod 2}) for t = 0, 1, ... from zero, w exactly q * d: 16 lanes, lane k mod 16.
// Two accumulators per output halve the FMA latency chain. Built with -ffp-contract=off -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace jserve {
namespace {

constexpr int64_t kFusedMaxM = 4;  // up to this many rows: fused driver; above: panel driver
constexpr int kR = 2, kC = 3;         // panel driver's register tile (2 R C = 12 accumulators)
constexpr int kFusedC1 = 3;           // columns per tile of the one-row fused driver
constexpr int64_t kXBlock = 32768;    // floats of x per row block (~128 KiB, stays in L2)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses it,
// and a tile reloads each weight vector once per row (load-bound instead of FMA-bound).
inline void pin(__m256& v) { asm("" : "+x"(v)); }

inline float reduce(__m256 a0, __m256 a1) { return hsum(_mm256_add_ps(a0, a1)); }

inline __m256i tail_mask(int64_t rem) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - rem));
}

// K-quant scales of columns n .. n+C-1 as floats (kquant_scales' exact products, 8 at a time):
// ds [C, ds_stride], mv [C, nbp] (Q4_K/Q5_K), mv zero past nb.
template <int FMT>
void scales(const Problem& p, int64_t n, int C, float* ds, float* mv) {
  const int64_t nb = p.K / 32, nbp = padded_blocks(p.K);
  static_assert(FMT >= kQ4_K, "K-quants only");
  {
    const int64_t ns = p.K / 256;
    constexpr int64_t width = FMT == kQ4_K ? 140 : FMT == kQ5_K ? 172 : 208;
    for (int c = 0; c < C; ++c) {
      const uint8_t* col = static_cast<const uint8_t*>(p.qs) + (n + c) * ns * width;
      float* dc = ds + c * ds_stride(p.K);
      float* mc = mv + c * nbp;
      for (int64_t s = 0; s < ns; ++s) {
        const uint8_t* blk = col + s * width;
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(p.d[(n + c) * ns + s]));
        if constexpr (FMT == kQ6_K) {
          for (int i = 0; i < 2; ++i) {
            const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 192 + 8 * i)));
            _mm256_storeu_ps(dc + 16 * s + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)));
          }
        } else {
          uint32_t dd, mm, md;  // get_scale_min_k4 on four bytes at once
          __builtin_memcpy(&dd, blk, 4);
          __builtin_memcpy(&mm, blk + 4, 4);
          __builtin_memcpy(&md, blk + 8, 4);
          const uint32_t sc_lo = dd & 0x3f3f3f3fu, sc_hi = (md & 0x0f0f0f0fu) | ((dd >> 2) & 0x30303030u);
          const uint32_t mn_lo = mm & 0x3f3f3f3fu, mn_hi = ((md >> 4) & 0x0f0f0f0fu) | ((mm >> 2) & 0x30303030u);
          const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
          const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo)));
          _mm256_storeu_ps(dc + 8 * s, _mm256_mul_ps(d, sc));
          const __m256 dmin = _mm256_set1_ps(_cvtsh_ss(p.m[(n + c) * ns + s]));
          _mm256_storeu_ps(mc + 8 * s, _mm256_mul_ps(dmin, _mm256_sub_ps(_mm256_setzero_ps(), mn)));
        }
      }
      for (int64_t b = nb; b < nbp; ++b) mc[b] = 0.0f;
    }
  }
}

// Continues the accumulators over the offset terms sx[r, i] * mv[c, i], i < nbp, 8 at a time.
#define JSERVE_ADD_OFFSETS(R, C, sxr, mv, nbp, acc)                                                   \
  for (int64_t i = 0; i < (nbp); i += 16) {                                                          \
    for (int r = 0; r < (R); ++r) {                                                                  \
      const __m256 s0 = _mm256_loadu_ps((sxr)[r] + i);                                               \
      for (int c = 0; c < (C); ++c)                                                                  \
        acc[r][c][0] = _mm256_fmadd_ps(s0, _mm256_loadu_ps((mv) + c * (nbp) + i), acc[r][c][0]);     \
    }                                                                                                \
    if (i + 8 < (nbp)) {                                                                             \
      for (int r = 0; r < (R); ++r) {                                                                \
        const __m256 s1 = _mm256_loadu_ps((sxr)[r] + i + 8);                                         \
        for (int c = 0; c < (C); ++c)                                                                \
          acc[r][c][1] = _mm256_fmadd_ps(s1, _mm256_loadu_ps((mv) + c * (nbp) + i + 8), acc[r][c][1]); \
      }                                                                                              \
    }                                                                                                \
  }

// Elements 8j .. 8j+7 of 32-value block b of a column (its qs at col, its scale slots at dsc) as
// exact floats; the same integers as kquant_q.
template <int FMT>
inline __m256 weights8(const uint8_t* col, int64_t b, int j, const float* dsc) {
  static_assert(FMT >= kQ4_K, "K-quants only");
  {
    const int64_t s = b >> 3;
    const int t = (int)(b & 7);
    auto load8 = [](const uint8_t* a) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)));
    };
    __m256i v;
    float d;
    if constexpr (FMT == kQ6_K) {
      const uint8_t* blk = col + s * 208;
      const int h = t >> 2, qq = t & 3;
      __m256i lo = load8(blk + 64 * h + 32 * (qq & 1) + 8 * j);
      lo = qq >= 2 ? _mm256_srli_epi32(lo, 4) : _mm256_and_si256(lo, _mm256_set1_epi32(0xf));
      __m256i hi = _mm256_srlv_epi32(load8(blk + 128 + 32 * h + 8 * j), _mm256_set1_epi32(2 * qq));
      hi = _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(3)), 4);
      v = _mm256_sub_epi32(_mm256_or_si256(lo, hi), _mm256_set1_epi32(32));
      d = dsc[2 * b + (j >> 1)];
    } else {
      const uint8_t* blk = col + s * kq_width(FMT);
      v = load8(blk + (FMT == kQ4_K ? 12 : 44) + 32 * (t >> 1) + 8 * j);
      v = (t & 1) ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(0xf));
      if constexpr (FMT == kQ5_K) {
        __m256i hi = _mm256_srlv_epi32(load8(blk + 12 + 8 * j), _mm256_set1_epi32(t));
        v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), 4));
      }
      d = dsc[b];
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(d));
  }
}

// weights8 for K-quants with the sub-block T (b mod 8) and chunk J compile-time constants (shifts
// and offsets become immediates): elements 8J .. 8J+7 of block 8s + T, blk = the super-block's qs,
// d its scale slot. The same integers and products as weights8.
template <int FMT, int T, int J>
inline __attribute__((always_inline)) __m256 kweights8(const uint8_t* blk, float d) {
  auto load8 = [](const uint8_t* a) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)));
  };
  __m256i v;
  if constexpr (FMT == kQ6_K) {
    constexpr int h = T >> 2, qq = T & 3;
    __m256i lo = load8(blk + 64 * h + 32 * (qq & 1) + 8 * J);
    if constexpr (qq >= 2) {
      lo = _mm256_srli_epi32(lo, 4);
    } else {
      lo = _mm256_and_si256(lo, _mm256_set1_epi32(0xf));
    }
    __m256i hi = _mm256_srli_epi32(load8(blk + 128 + 32 * h + 8 * J), 2 * qq);
    hi = _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(3)), 4);
    v = _mm256_sub_epi32(_mm256_or_si256(lo, hi), _mm256_set1_epi32(32));
  } else {
    v = load8(blk + (FMT == kQ4_K ? 12 : 44) + 32 * (T >> 1) + 8 * J);
    if constexpr (T & 1) {
      v = _mm256_srli_epi32(v, 4);
    } else {
      v = _mm256_and_si256(v, _mm256_set1_epi32(0xf));
    }
    if constexpr (FMT == kQ5_K) {
      const __m256i hi = _mm256_srli_epi32(load8(blk + 12 + 8 * J), T);
      v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), 4));
    }
  }
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(d));
}

// Elements 8J .. 8J+7 of 32-value block 8s + T of a K-quant, R rows x C columns.
template <int R, int C, int FMT, int T, int J>
inline __attribute__((always_inline)) void kblock_step(const uint8_t* q0, int64_t s, int64_t rowb, int64_t dss,
                                                       const float* ds, const float* const* xr, __m256 (*acc)[C][2]) {
  __m256 w[C];
  constexpr int64_t width = FMT == kQ4_K ? 140 : FMT == kQ5_K ? 172 : 208;
  const int64_t slot = FMT == kQ6_K ? 16 * s + 2 * T + (J >> 1) : 8 * s + T;
  for (int c = 0; c < C; ++c) w[c] = kweights8<FMT, T, J>(q0 + c * rowb + s * width, ds[c * dss + slot]);
  for (int r = 0; r < R; ++r) {
    const __m256 xv = _mm256_loadu_ps(xr[r] + s * 256 + T * 32 + 8 * J);
    for (int c = 0; c < C; ++c) acc[r][c][J & 1] = _mm256_fmadd_ps(xv, w[c], acc[r][c][J & 1]);
  }
}

template <int R, int C, int FMT, int T>
inline __attribute__((always_inline)) void ksub_step(const uint8_t* q0, int64_t s, int64_t rowb, int64_t dss,
                                                     const float* ds, const float* const* xr, __m256 (*acc)[C][2]) {
  kblock_step<R, C, FMT, T, 0>(q0, s, rowb, dss, ds, xr, acc);
  kblock_step<R, C, FMT, T, 1>(q0, s, rowb, dss, ds, xr, acc);
  kblock_step<R, C, FMT, T, 2>(q0, s, rowb, dss, ds, xr, acc);
  kblock_step<R, C, FMT, T, 3>(q0, s, rowb, dss, ds, xr, acc);
}

inline void store_output(const Problem& p, int64_t r, int64_t n, __m256 a0, __m256 a1) {
  p.y[r * p.N + n] = reduce(a0, a1);
}

// Fused driver: rows r0 .. r0+R-1 x columns n0 .. n0+C-1, weights unpacked in registers. Several
// columns at once keep 2 R C independent FMA chains in flight.
template <int R, int C, int FMT>
__attribute__((noinline)) void fused(const Problem& p, int64_t r0, int64_t n0, float* ds, float* mv) {
  const int64_t K = p.K;
  // Scales first: accumulators live across no call (SysV clobbers every ymm; GCC would keep them in memory).
  if constexpr (FMT != kF32) scales<FMT>(p, n0, C, ds, mv);
  const float* xr[R];
  __m256 acc[R][C][2];
  for (int r = 0; r < R; ++r) {
    xr[r] = p.x + (r0 + r) * K;
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  }
  if constexpr (FMT == kF32) {
    const float* wn = static_cast<const float*>(p.qs) + n0 * K;
    const int64_t K8 = K & ~int64_t{7};
    for (int64_t k = 0; k < K8; k += 8) {
      const int j = (k >> 3) & 1;
      __m256 w[C];
      for (int c = 0; c < C; ++c) w[c] = _mm256_loadu_ps(wn + c * K + k);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(xr[r] + k);
        for (int c = 0; c < C; ++c) acc[r][c][j] = _mm256_fmadd_ps(xv, w[c], acc[r][c][j]);
      }
    }
    if (K8 < K) {
      const int j = (K8 >> 3) & 1;
      const __m256i mask = tail_mask(K - K8);
      __m256 w[C];
      for (int c = 0; c < C; ++c) w[c] = _mm256_maskload_ps(wn + c * K + K8, mask);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_maskload_ps(xr[r] + K8, mask);
        for (int c = 0; c < C; ++c) acc[r][c][j] = _mm256_fmadd_ps(xv, w[c], acc[r][c][j]);
      }
    }
  } else {
    const int64_t rowb = row_bytes(FMT, K), dss = ds_stride(K);
    const uint8_t* q0 = static_cast<const uint8_t*>(p.qs) + n0 * rowb;
    if constexpr (FMT >= kQ4_K) {  // super-block by super-block, its 8 blocks in order
      for (int64_t s = 0; s < K / 256; ++s) {
        ksub_step<R, C, FMT, 0>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 1>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 2>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 3>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 4>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 5>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 6>(q0, s, rowb, dss, ds, xr, acc);
        ksub_step<R, C, FMT, 7>(q0, s, rowb, dss, ds, xr, acc);
      }
    }
  }
  if constexpr (FMT == kQ4_0 || FMT == kQ4_1 || FMT == kQ4_K || FMT == kQ5_K) {
    const int64_t nbp = padded_blocks(K);
    const float* sxr[R];
    for (int r = 0; r < R; ++r) sxr[r] = p.sx + (r0 + r) * nbp;
    JSERVE_ADD_OFFSETS(R, C, sxr, mv, nbp, acc)
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store_output(p, r0 + r, n0 + c, acc[r][c][0], acc[r][c][1]);
}

template <int R, int C, int FMT>
void fused_columns(const Problem& p, int64_t n0, int64_t n1, float* ds, float* mv) {
  int64_t n = n0;
  for (; n + C <= n1; n += C) fused<R, C, FMT>(p, 0, n, ds, mv);
  for (; n < n1; ++n) fused<R, 1, FMT>(p, 0, n, ds, mv);
}

// Unpacks columns n .. n+C-1 into w [C, Kp] (zero padded) and their offsets into mv [C, nb].
template <int FMT>
void unpack_panel(const Problem& p, int64_t n, int C, int64_t Kp, float* w, float* ds, float* mv) {
  const int64_t K = p.K, nb = K / 32, rowb = row_bytes(FMT, K);
  if constexpr (FMT != kF32) scales<FMT>(p, n, C, ds, mv);
  for (int c = 0; c < C; ++c) {
    float* wc = w + c * Kp;
    if constexpr (FMT == kF32) {
      const float* src = static_cast<const float*>(p.qs) + (n + c) * K;
      std::copy(src, src + K, wc);
      std::fill(wc + K, wc + Kp, 0.0f);
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(p.qs) + (n + c) * rowb;
      for (int64_t b = 0; b < nb; ++b)
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(wc + b * 32 + 8 * j, weights8<FMT>(q, b, j, ds + c * ds_stride(K)));
    }
  }
}

template <int R, int C>
void tile(const Problem& p, int64_t r0, int64_t n0, const float* w, int64_t Kp, const float* mv) {
  const int64_t K = p.K, K8 = K & ~int64_t{7};
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (r0 + r) * K;
  __m256 acc[R][C][2];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K8; k += 16) {
    for (int j = 0; j < 2; ++j) {
      __m256 wv[C];
      for (int c = 0; c < C; ++c) {
        wv[c] = _mm256_loadu_ps(w + c * Kp + k + 8 * j);
        pin(wv[c]);
      }
      for (int r = 0; r < R; ++r) {
        __m256 xv = _mm256_loadu_ps(xr[r] + k + 8 * j);
        if (C > 1) pin(xv);
        for (int c = 0; c < C; ++c) acc[r][c][j] = _mm256_fmadd_ps(xv, wv[c], acc[r][c][j]);
      }
    }
  }
  if (k < K8) {  // f32 only: one more chunk of 8, t even
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xr[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c][0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + c * Kp + k), acc[r][c][0]);
    }
  }
  if (K8 < K) {  // f32 only: x masked to zero past K, w zero padded
    const int j = (K8 >> 3) & 1;
    const __m256i mask = tail_mask(K - K8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(xr[r] + K8, mask);
      for (int c = 0; c < C; ++c) acc[r][c][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + c * Kp + K8), acc[r][c][j]);
    }
  }
  if (has_offset(p.fmt)) {
    const int64_t nbp = padded_blocks(K);
    const float* sxr[R];
    for (int r = 0; r < R; ++r) sxr[r] = p.sx + (r0 + r) * nbp;
    JSERVE_ADD_OFFSETS(R, C, sxr, mv, nbp, acc)
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store_output(p, r0 + r, n0 + c, acc[r][c][0], acc[r][c][1]);
}

template <int C>
void tile_rows(const Problem& p, int64_t r0, int64_t r1, int64_t n, const float* w, int64_t Kp, const float* mv) {
  int64_t r = r0;
  for (; r + kR <= r1; r += kR) tile<kR, C>(p, r, n, w, Kp, mv);
  for (; r < r1; ++r) tile<1, C>(p, r, n, w, Kp, mv);
}

template <int FMT>
void panel_columns(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t K = p.K, Kp = (K + 7) & ~int64_t{7};
  // Each row block of x stays in L2 while every panel of the column range passes over it.
  const int64_t rows_per_block = std::max<int64_t>(kR, (kXBlock / std::max<int64_t>(K, 1)) / kR * kR);
  std::vector<float> w(kC * Kp), ds(kC * ds_stride(K) + 1), mv(kC * padded_blocks(K) + 1);
  for (int64_t rb = 0; rb < p.M; rb += rows_per_block) {
    const int64_t re = std::min(p.M, rb + rows_per_block);
    int64_t n = n0;
    for (; n + kC <= n1; n += kC) {
      unpack_panel<FMT>(p, n, kC, Kp, w.data(), ds.data(), mv.data());
      tile_rows<kC>(p, rb, re, n, w.data(), Kp, mv.data());
    }
    for (; n < n1; ++n) {
      unpack_panel<FMT>(p, n, 1, Kp, w.data(), ds.data(), mv.data());
      tile_rows<1>(p, rb, re, n, w.data(), Kp, mv.data());
    }
  }
}

template <int FMT>
void columns(const Problem& p, int64_t n0, int64_t n1) {
  if (p.M > kFusedMaxM) return panel_columns<FMT>(p, n0, n1);
  std::vector<float> ds(4 * ds_stride(p.K) + 1), mv(4 * padded_blocks(p.K) + 1);
  switch (p.M) {  // R x C tiles: 6-8 FMA chains, no spills
    case 1: fused_columns<1, kFusedC1, FMT>(p, n0, n1, ds.data(), mv.data()); break;
    case 2: fused_columns<2, 2, FMT>(p, n0, n1, ds.data(), mv.data()); break;
    case 3: fused_columns<3, 1, FMT>(p, n0, n1, ds.data(), mv.data()); break;
    default: fused_columns<4, 1, FMT>(p, n0, n1, ds.data(), mv.data()); break;
  }
}

}  // namespace

void block_sums_avx2(const Problem& p, float* sx) {
  const int64_t nb = p.K / 32;
  for (int64_t r = 0; r < p.M; ++r) {
    const float* xr = p.x + r * p.K;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = xr + b * 32;
      __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                               _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
      sx[r * padded_blocks(p.K) + b] = hsum(s);
    }
  }
}

void columns_avx2(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case kF32: columns<kF32>(p, n0, n1); break;
    case kQ8_0:
    case kQ4_0:
    case kQ4_1: idot_columns_avx2(p, n0, n1); break;
    case kQ4_K: columns<kQ4_K>(p, n0, n1); break;
    case kQ5_K: columns<kQ5_K>(p, n0, n1); break;
    default: columns<kQ6_K>(p, n0, n1); break;
  }
}

}  // namespace jserve
