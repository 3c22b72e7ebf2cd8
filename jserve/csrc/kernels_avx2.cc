// AVX2 + FMA + F16C path. Two drivers share one per-output recipe, so they give the same bits:
//  - fused (few rows): unpack a weight block into registers, use it for up to 4 rows at once;
//  - panel (many rows): unpack kC columns into a float scratch once per row block, then an
//    kR x kC register tile of accumulators.
// Either way y[r, n] = tree(acc) (+ offset term), acc = fma(x[k:k+8], w[k:k+8], acc) for k = 0, 8, ...
// from zero, w exactly q * d. Built with -ffp-contract=off -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace jserve {
namespace {

constexpr int kFusedRows = 4;    // rows sharing one unpacked block in the fused driver
constexpr int64_t kFusedMaxM = 4;  // up to this many rows: fused driver; above: panel driver
constexpr int kR = 4, kC = 3;    // panel driver's register tile (12 accumulators)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

inline __m256i tail_mask(int64_t rem) {
  alignas(32) static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ones + 8 - rem));
}

// sum_b mv[b] * s[b]: 8 lanes over blocks, then the remaining blocks in order.
inline float offset_term(const float* mv, const float* s, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(mv + b), _mm256_loadu_ps(s + b), acc);
  float o = hsum(acc);
  for (; b < nb; ++b) o = o + mv[b] * s[b];
  return o;
}

// Block b of column n as 4 vectors of exact q * d (elements 0-7, 8-15, 16-23, 24-31); mv[b] = offset.
template <int FMT>
inline void unpack_block(const Problem& p, int64_t n, int64_t b, int64_t nb, __m256 w[4], float* mv) {
  const int64_t i = n * nb + b;
  const float d = _cvtsh_ss(p.d[i]);
  const __m256 dv = _mm256_set1_ps(d);
  if constexpr (FMT == kQ8_0) {
    const int8_t* q = static_cast<const int8_t*>(p.qs) + i * 32;
    for (int j = 0; j < 4; ++j) {
      __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j)));
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(v), dv);
    }
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(p.qs) + i * 16;
    const __m256i lo4 = _mm256_set1_epi32(0xf);
    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, lo4)), dv);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, lo4)), dv);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), dv);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), dv);
    mv[b] = FMT == kQ4_1 ? _cvtsh_ss(p.m[i]) : -8.0f * d;
  }
}

inline void store_outputs(const Problem& p, int64_t r, int64_t n, __m256 acc, const float* mv) {
  float y = hsum(acc);
  if (has_offset(p.fmt)) {
    const int64_t nb = p.K / 32;
    y = y + offset_term(mv, p.sx + r * nb, nb);
  }
  p.y[r * p.N + n] = y;
}

// Fused driver: rows r0 .. r0+R-1, one column n.
template <int R, int FMT>
void fused(const Problem& p, int64_t r0, int64_t n, float* mv) {
  const int64_t K = p.K;
  const float* xr[R];
  __m256 acc[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = p.x + (r0 + r) * K;
    acc[r] = _mm256_setzero_ps();
  }
  if constexpr (FMT == kF32) {
    const float* wn = static_cast<const float*>(p.qs) + n * K;
    const int64_t K8 = K & ~int64_t{7};
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 w = _mm256_loadu_ps(wn + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k), w, acc[r]);
    }
    if (K8 < K) {
      const __m256i mask = tail_mask(K - K8);
      const __m256 w = _mm256_maskload_ps(wn + K8, mask);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_maskload_ps(xr[r] + K8, mask), w, acc[r]);
    }
  } else {
    const int64_t nb = K / 32;
    __m256 w[4];
    for (int64_t b = 0; b < nb; ++b) {
      unpack_block<FMT>(p, n, b, nb, w, mv);
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + b * 32 + 8 * j), w[j], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) store_outputs(p, r0 + r, n, acc[r], mv);
}

template <int FMT>
void fused_columns(const Problem& p, int64_t n0, int64_t n1, float* mv) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t r = 0;
    for (; r + kFusedRows <= p.M; r += kFusedRows) fused<kFusedRows, FMT>(p, r, n, mv);
    switch (p.M - r) {
      case 1: fused<1, FMT>(p, r, n, mv); break;
      case 2: fused<2, FMT>(p, r, n, mv); break;
      case 3: fused<3, FMT>(p, r, n, mv); break;
      default: break;
    }
  }
}

// Unpacks columns n .. n+C-1 into w [C, Kp] (zero padded) and mv [C, nb].
template <int FMT>
void unpack_panel(const Problem& p, int64_t n, int C, int64_t Kp, float* w, float* mv) {
  const int64_t K = p.K, nb = K / 32;
  for (int c = 0; c < C; ++c) {
    float* wc = w + c * Kp;
    if constexpr (FMT == kF32) {
      const float* src = static_cast<const float*>(p.qs) + (n + c) * K;
      std::copy(src, src + K, wc);
      std::fill(wc + K, wc + Kp, 0.0f);
    } else {
      __m256 v[4];
      for (int64_t b = 0; b < nb; ++b) {
        unpack_block<FMT>(p, n + c, b, nb, v, mv + c * nb);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(wc + b * 32 + 8 * j, v[j]);
      }
    }
  }
}

template <int R, int C>
void tile(const Problem& p, int64_t r0, int64_t n0, const float* w, int64_t Kp, const float* mv) {
  const int64_t K = p.K, K8 = K & ~int64_t{7}, nb = K / 32;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (r0 + r) * K;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * Kp + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xr[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (K8 < K) {  // f32 only: x masked to zero past K, w zero padded
    const __m256i mask = tail_mask(K - K8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(xr[r] + K8, mask);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + c * Kp + K8), acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store_outputs(p, r0 + r, n0 + c, acc[r][c], mv + c * nb);
}

template <int C>
void tile_rows(const Problem& p, int64_t r0, int64_t r1, int64_t n, const float* w, int64_t Kp, const float* mv) {
  int64_t r = r0;
  for (; r + kR <= r1; r += kR) tile<kR, C>(p, r, n, w, Kp, mv);
  switch (r1 - r) {
    case 1: tile<1, C>(p, r, n, w, Kp, mv); break;
    case 2: tile<2, C>(p, r, n, w, Kp, mv); break;
    case 3: tile<3, C>(p, r, n, w, Kp, mv); break;
    default: break;
  }
}

template <int FMT>
void panel_columns(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t K = p.K, Kp = (K + 7) & ~int64_t{7}, nb = K / 32;
  // Row blocks of ~128 KiB of x stay in L2 while every panel of the column range passes over them.
  const int64_t rows_per_block = std::max<int64_t>(kR, (32768 / std::max<int64_t>(K, 1)) / kR * kR);
  std::vector<float> w(kC * Kp), mv(kC * std::max<int64_t>(nb, 1));
  for (int64_t rb = 0; rb < p.M; rb += rows_per_block) {
    const int64_t re = std::min(p.M, rb + rows_per_block);
    for (int64_t n = n0; n < n1; n += kC) {
      const int C = static_cast<int>(std::min<int64_t>(kC, n1 - n));
      unpack_panel<FMT>(p, n, C, Kp, w.data(), mv.data());
      switch (C) {
        case 3: tile_rows<3>(p, rb, re, n, w.data(), Kp, mv.data()); break;
        case 2: tile_rows<2>(p, rb, re, n, w.data(), Kp, mv.data()); break;
        default: tile_rows<1>(p, rb, re, n, w.data(), Kp, mv.data()); break;
      }
    }
  }
}

template <int FMT>
void columns(const Problem& p, int64_t n0, int64_t n1) {
  if (p.M <= kFusedMaxM) {
    std::vector<float> mv(std::max<int64_t>(p.K / 32, 1));
    fused_columns<FMT>(p, n0, n1, mv.data());
  } else {
    panel_columns<FMT>(p, n0, n1);
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
      sx[r * nb + b] = hsum(s);
    }
  }
}

void columns_avx2(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case kF32: columns<kF32>(p, n0, n1); break;
    case kQ8_0: columns<kQ8_0>(p, n0, n1); break;
    case kQ4_0: columns<kQ4_0>(p, n0, n1); break;
    default: columns<kQ4_1>(p, n0, n1); break;
  }
}

}  // namespace jserve
