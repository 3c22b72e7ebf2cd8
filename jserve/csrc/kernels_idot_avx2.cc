// AVX2 integer-dot recipe for Q8_0, Q4_0 and Q4_1 (kernels.h states it). Two drivers, the same bits:
//  - fused (M <= 4 rows): weight blocks unpacked to int16 in registers, each used for every row of a tile;
//  - panel (more rows): a few columns unpacked to an int16 panel once per row block, then tiles of rows.
// The integer sums are exact (any order gives them), so only the float steps fix the bits, and both
// drivers run them alike: per group of 8 blocks, acc = fma(float(isum), d * s, acc), then
// acc = fma(sx, m, acc) for Q4_0/Q4_1, lane = block mod 8; then hsum. Built with -ffp-contract=off
// -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace jserve {
namespace {

constexpr int64_t kFusedMaxM = 4;     // up to this many rows: fused driver; above: panel driver
constexpr int kPanelC = 3;            // columns per panel
constexpr int kPanelR = 4;            // rows per panel tile (3 x 4 int32 sums + 3 weight vectors + x)
constexpr int64_t kPrefetch = 2048;   // bytes ahead of the weight stream to prefetch (halves Q8_0's time at M = 1)
constexpr int64_t kXqBlock = 65536;   // int16 of xq per row block of the panel driver (128 KiB, in L2)

// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the generic path's tree8.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Block quants at q as 32 int16: w0 = elements 0..15, w1 = elements 16..31 (Q4: low nibbles of bytes
// 0..15, then their high nibbles, unsigned).
template <int FMT>
inline __attribute__((always_inline)) void unpack(const uint8_t* q, __m256i& w0, __m256i& w1) {
  if constexpr (FMT == kQ8_0) {
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
  } else {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w0 = _mm256_and_si256(v, _mm256_set1_epi16(0xf));
    w1 = _mm256_srli_epi16(v, 4);
  }
}

// Weights straight from the blocks (fused driver).
template <int FMT>
struct Blocks {
  const uint8_t* q;    // column n0's first block
  int64_t rowb;        // bytes per column
  const uint16_t* dh;  // column n0's scales d (f16)
  const uint16_t* mh;  // column n0's m (Q4_1)
  int64_t nb;          // blocks per column
  inline __attribute__((always_inline)) void load(int c, int64_t b, __m256i& w0, __m256i& w1) const {
    unpack<FMT>(q + c * rowb + b * (FMT == kQ8_0 ? 32 : 16), w0, w1);
  }
  // The weight stream kPrefetch bytes ahead of group b0 .. b0+7 of C columns.
  inline __attribute__((always_inline)) void prefetch(int C, int64_t b0) const {
    constexpr int64_t bytes = FMT == kQ8_0 ? 256 : 128;  // a group of 8 blocks
    for (int c = 0; c < C; ++c)
      for (int64_t i = 0; i < bytes; i += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q + c * rowb + b0 * (bytes / 8) + kPrefetch + i), _MM_HINT_T0);
  }
  // Column c's d and m (Q4_1) or -8 d (Q4_0) for blocks b0 .. b0+7 as floats, zero past b0 + valid:
  // col_scales' values.
  inline __attribute__((always_inline)) void scales(int c, int64_t b0, int valid, __m256& dv, __m256& mv) const {
    const uint16_t* d = dh + c * nb + b0;
    const uint16_t* m = FMT == kQ4_1 ? mh + c * nb + b0 : nullptr;
    if constexpr (FMT == kQ8_0) mv = _mm256_setzero_ps();
    if (valid == 8) {
      dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d)));
      if constexpr (FMT == kQ4_1) mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
      if constexpr (FMT == kQ4_0) mv = _mm256_mul_ps(_mm256_set1_ps(-8.0f), dv);
      return;
    }
    alignas(32) float dt[8] = {0, 0, 0, 0, 0, 0, 0, 0}, mt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < valid; ++i) {
      dt[i] = _cvtsh_ss(d[i]);
      if constexpr (FMT == kQ4_1) mt[i] = _cvtsh_ss(m[i]);
      if constexpr (FMT == kQ4_0) mt[i] = -8.0f * dt[i];
    }
    dv = _mm256_load_ps(dt);
    mv = _mm256_load_ps(mt);
  }
};

// Interleaved layout (panel driver): per group of 8 blocks, 16 vectors; vector t holds elements
// 2t, 2t+1 of block l in its int32 lane l, so madd + add over t leave block l's sum in lane l.
constexpr int64_t kGroup = 256;  // int16 per group of 8 blocks

// Rewrites n groups [8 blocks][16 pairs] (int32 pairs of int16) as [16 pairs][8 blocks], in place:
// two 8 x 8 int32 transposes per group.
inline void interleave_groups(int16_t* v, int64_t n) {
  for (int64_t g = 0; g < n; ++g) {
    __m256i* u = reinterpret_cast<__m256i*>(v + g * kGroup);  // row l: u[2l] pairs 0..7, u[2l+1] pairs 8..15
    __m256i a[2][8];
    for (int h = 0; h < 2; ++h) {
      __m256i r[8], t[8];
      for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_si256(u + 2 * l + h);
      for (int l = 0; l < 8; l += 2) {
        t[l] = _mm256_unpacklo_epi32(r[l], r[l + 1]);
        t[l + 1] = _mm256_unpackhi_epi32(r[l], r[l + 1]);
      }
      for (int l = 0; l < 8; l += 4)
        for (int i = 0; i < 2; ++i) {
          r[l + i] = _mm256_unpacklo_epi64(t[l + i], t[l + 2 + i]);
          r[l + 2 + i] = _mm256_unpackhi_epi64(t[l + i], t[l + 2 + i]);
        }
      // r[0]: pairs (0, 4) of rows 0..3 -> 128-bit halves; combine rows 0..3 with rows 4..7
      for (int i = 0; i < 4; ++i) {
        a[h][i] = _mm256_permute2x128_si256(r[i], r[4 + i], 0x20);
        a[h][4 + i] = _mm256_permute2x128_si256(r[i], r[4 + i], 0x31);
      }
    }
    // a[h][i]: pair 8h + p(i) for the 8 rows, p = (0, 2, 1, 3, 4, 6, 5, 7) from the unpack order
    static constexpr int kPair[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 8; ++i) _mm256_storeu_si256(u + 8 * h + kPair[i], a[h][i]);
  }
}

// Weights from an interleaved int16 panel [C, padded blocks / 8, kGroup] (panel driver).
struct Panel {
  const int16_t* w;
  int64_t stride;  // int16 per column
};

// Column n's scales as floats: d [nbp] (zero past nb), mv [nbp] = m (Q4_1) or -8 d (Q4_0), zero past nb.
template <int FMT>
void col_scales(const Problem& p, int64_t n, float* d, float* mv) {
  const int64_t nb = p.K / 32, nbp = padded_blocks(p.K);
  const uint16_t* dh = p.d + n * nb;
  const uint16_t* mh = FMT == kQ4_1 ? p.m + n * nb : nullptr;
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dh + b)));
    _mm256_storeu_ps(d + b, dv);
    if constexpr (FMT == kQ4_1) _mm256_storeu_ps(mv + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mh + b))));
    if constexpr (FMT == kQ4_0) _mm256_storeu_ps(mv + b, _mm256_mul_ps(_mm256_set1_ps(-8.0f), dv));
  }
  for (; b < nb; ++b) {
    d[b] = _cvtsh_ss(dh[b]);
    if constexpr (FMT == kQ4_1) mv[b] = _cvtsh_ss(mh[b]);
    if constexpr (FMT == kQ4_0) mv[b] = -8.0f * d[b];
  }
  for (; b < nbp; ++b) d[b] = mv[b] = 0.0f;
}

// Exact integer dots of blocks b0 .. b0+7 (those < b0 + valid; the rest count as zero) for R rows x C
// columns: lane l of out[r][c] = sum_j xq[r][32 (b0 + l) + j] * q[c][b0 + l][j].
template <int R, int C, bool FULL, class Src>
inline __attribute__((always_inline)) void group(const Src& src, const int16_t* const* xr, int64_t b0, int valid,
                                                 __m256i (*out)[C]) {
  __m256i h2[R][C][2];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256i h1[R][C][2];
#pragma GCC unroll 2
    for (int pr = 0; pr < 2; ++pr) {
      __m256i v[R][C][2];
      if (!FULL && 4 * h + 2 * pr >= valid) {  // a tail's absent pairs of blocks cost nothing
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < C; ++c) h1[r][c][pr] = _mm256_setzero_si256();
        continue;
      }
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        const int j = 4 * h + 2 * pr + e;
        if (FULL || j < valid) {
          const int64_t b = b0 + j;
          __m256i w0[C], w1[C];
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) src.load(c, b, w0[c], w1[c]);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[r] + b * 32));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[r] + b * 32 + 16));
#pragma GCC unroll 4
            for (int c = 0; c < C; ++c)
              v[r][c][e] = _mm256_add_epi32(_mm256_madd_epi16(x0, w0[c]), _mm256_madd_epi16(x1, w1[c]));
          }
        } else {
          for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) v[r][c][e] = _mm256_setzero_si256();
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) h1[r][c][pr] = _mm256_hadd_epi32(v[r][c][0], v[r][c][1]);
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) h2[r][c][h] = _mm256_hadd_epi32(h1[r][c][0], h1[r][c][1]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      out[r][c] = _mm256_add_epi32(_mm256_permute2x128_si256(h2[r][c][0], h2[r][c][1], 0x20),
                                   _mm256_permute2x128_si256(h2[r][c][0], h2[r][c][1], 0x31));
}

// Rows r0 .. r0+R-1 x columns n0 .. n0+C-1 (fused driver; xq in natural order).
template <int R, int C, int FMT>
__attribute__((noinline)) void tile(const Problem& p, int64_t r0, int64_t n0, const Blocks<FMT>& src) {
  const int64_t nb = p.K / 32, nbp = padded_blocks(p.K);
  const int16_t* xr[R];
  const float* xs[R];
  const float* sx[R];
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) {
    xr[r] = p.xq + (r0 + r) * nbp * 32;
    xs[r] = p.xs + (r0 + r) * nbp;
    sx[r] = has_offset(FMT) ? p.sx + (r0 + r) * nbp : nullptr;
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  auto floats = [&](int64_t b0, int valid, __m256i (*isum)[C]) __attribute__((always_inline)) {
    __m256 dv[C], mv[C];
    for (int c = 0; c < C; ++c) src.scales(c, b0, valid, dv[c], mv[c]);
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_loadu_ps(xs[r] + b0);
      for (int c = 0; c < C; ++c) {
        const __m256 ds = _mm256_mul_ps(dv[c], s);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), ds, acc[r][c]);
        if constexpr (FMT != kQ8_0) acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(sx[r] + b0), mv[c], acc[r][c]);
      }
    }
  };
  int64_t b0 = 0;
  for (; b0 + 8 <= nb; b0 += 8) {
    __m256i isum[R][C];
    src.prefetch(C, b0);
    group<R, C, true>(src, xr, b0, 8, isum);
    floats(b0, 8, isum);
  }
  if (b0 < nb) {
    __m256i isum[R][C];
    group<R, C, false>(src, xr, b0, (int)(nb - b0), isum);
    floats(b0, (int)(nb - b0), isum);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[(r0 + r) * p.N + n0 + c] = hsum(acc[r][c]);
}

// Columns n0 .. n1-1 in tiles of C, rows 0 .. R1-1 then R1 .. R1+R2-1 over each tile (its weights
// still in L1 for the second pass).
template <int C, int R1, int R2, int FMT>
void fused_columns(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 32, rowb = row_bytes(FMT, p.K);
  const uint8_t* q = static_cast<const uint8_t*>(p.qs);
  auto src = [&](int64_t n) { return Blocks<FMT>{q + n * rowb, rowb, p.d + n * nb, FMT == kQ4_1 ? p.m + n * nb : nullptr, nb}; };
  int64_t n = n0;
  for (; n + C <= n1; n += C) {
    tile<R1, C, FMT>(p, 0, n, src(n));
    if constexpr (R2 > 0) tile<R2, C, FMT>(p, R1, n, src(n));
  }
  for (; n < n1; ++n) {
    tile<R1, 1, FMT>(p, 0, n, src(n));
    if constexpr (R2 > 0) tile<R2, 1, FMT>(p, R1, n, src(n));
  }
}

template <int FMT>
void fused_driver(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.M) {  // R x C tiles small enough to keep the partial sums in registers
    case 1: fused_columns<2, 1, 0, FMT>(p, n0, n1); break;
    case 2: fused_columns<1, 2, 0, FMT>(p, n0, n1); break;
    case 3: fused_columns<1, 2, 1, FMT>(p, n0, n1); break;
    default: fused_columns<1, 2, 2, FMT>(p, n0, n1); break;
  }
}

// Rows r0 .. r0+R-1 x the panel's columns n0 .. n0+C-1, xq interleaved like the panel: the same
// integer sums as group() (exact), the same float steps as tile().
template <int R, int C, int FMT>
__attribute__((noinline)) void panel_tile(const Problem& p, int64_t r0, int64_t n0, const Panel& src,
                                          const float* d, const float* mv) {
  const int64_t nbp = padded_blocks(p.K);
  const int16_t* xr[R];
  const float* xs[R];
  const float* sx[R];
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) {
    xr[r] = p.xq + (r0 + r) * nbp * 32;
    xs[r] = p.xs + (r0 + r) * nbp;
    sx[r] = has_offset(FMT) ? p.sx + (r0 + r) * nbp : nullptr;
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  for (int64_t b0 = 0; b0 < nbp; b0 += 8) {
    __m256i isum[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) isum[r][c] = _mm256_setzero_si256();
    const int64_t off = b0 * 32;
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      __m256i w[C];
      for (int c = 0; c < C; ++c)
        w[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src.w + c * src.stride + off + 16 * t));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[r] + off + 16 * t));
        for (int c = 0; c < C; ++c) isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(x, w[c]));
      }
      // Opaque to GCC, which would otherwise reassociate the sums into a tree of spilled products.
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) asm("" : "+x"(isum[r][c]));
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_loadu_ps(xs[r] + b0);
      for (int c = 0; c < C; ++c) {
        const __m256 ds = _mm256_mul_ps(_mm256_loadu_ps(d + c * nbp + b0), s);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), ds, acc[r][c]);
        if constexpr (FMT != kQ8_0)
          acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(sx[r] + b0), _mm256_loadu_ps(mv + c * nbp + b0), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[(r0 + r) * p.N + n0 + c] = hsum(acc[r][c]);
}

template <int C, int FMT>
void panel_rows(const Problem& p, int64_t r0, int64_t r1, int64_t n, const Panel& src, const float* d,
                const float* mv) {
  int64_t r = r0;
  for (; r + kPanelR <= r1; r += kPanelR) panel_tile<kPanelR, C, FMT>(p, r, n, src, d, mv);
  for (; r + 2 <= r1; r += 2) panel_tile<2, C, FMT>(p, r, n, src, d, mv);
  for (; r < r1; ++r) panel_tile<1, C, FMT>(p, r, n, src, d, mv);
}

template <int FMT>
void panel_driver(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / 32, nbp = padded_blocks(p.K), stride = nbp * 32, rowb = row_bytes(FMT, p.K);
  const int64_t rows_per_block = std::max<int64_t>(kPanelR, kXqBlock / std::max<int64_t>(stride, 1) / kPanelR * kPanelR);
  std::vector<int16_t> w(kPanelC * stride + 16, 0);  // zero past nb, as xq
  std::vector<float> d(kPanelC * nbp + 8), mv(kPanelC * nbp + 8);
  const uint8_t* q = static_cast<const uint8_t*>(p.qs);
  auto unpack_panel = [&](int64_t n, int C) {
    for (int c = 0; c < C; ++c) {
      col_scales<FMT>(p, n + c, d.data() + c * nbp, mv.data() + c * nbp);
      const uint8_t* qc = q + (n + c) * rowb;
      int16_t* wc = w.data() + c * stride;
      for (int64_t b = 0; b < nb; ++b) {
        __m256i w0, w1;
        if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(qc + b * (FMT == kQ8_0 ? 32 : 16) + kPrefetch), _MM_HINT_T0);
        unpack<FMT>(qc + b * (FMT == kQ8_0 ? 32 : 16), w0, w1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wc + b * 32), w0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wc + b * 32 + 16), w1);
      }
      for (int64_t b = nb; b < nbp; ++b) std::fill(wc + b * 32, wc + b * 32 + 32, int16_t{0});
      interleave_groups(wc, nbp / 8);
    }
  };
  const Panel src{w.data(), stride};
  for (int64_t rb = 0; rb < p.M; rb += rows_per_block) {
    const int64_t re = std::min(p.M, rb + rows_per_block);
    int64_t n = n0;
    for (; n + kPanelC <= n1; n += kPanelC) {
      unpack_panel(n, kPanelC);
      panel_rows<kPanelC, FMT>(p, rb, re, n, src, d.data(), mv.data());
    }
    for (; n < n1; ++n) {
      unpack_panel(n, 1);
      panel_rows<1, FMT>(p, rb, re, n, src, d.data(), mv.data());
    }
  }
}

template <int FMT>
void idot_columns(const Problem& p, int64_t n0, int64_t n1) {
  if (p.M > kFusedMaxM) return panel_driver<FMT>(p, n0, n1);
  fused_driver<FMT>(p, n0, n1);
}

}  // namespace

void quantize_rows_avx2(const Problem& p, int16_t* xq, float* xs) {
  const int64_t K = p.K, nb = K / 32, nbp = padded_blocks(K);
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256 hi = _mm256_set1_ps(32767.0f), lo = _mm256_set1_ps(-32767.0f);
  for (int64_t r = 0; r < p.M; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = p.x + r * K + b * 32;
      __m256 v[4];
      __m256i mx = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        mx = _mm256_max_epi32(mx, _mm256_and_si256(_mm256_castps_si256(v[i]), absmask));
      }
      __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
      m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4e));
      m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xb1));
      const float s = _mm_cvtss_f32(_mm_castsi128_ps(m4)) / 32767.0f;
      xs[r * nbp + b] = s;
      int16_t* out = xq + (r * nbp + b) * 32;
      if (s == 0.0f) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_setzero_si256());
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_setzero_si256());
        continue;
      }
      const __m256 sv = _mm256_set1_ps(s);
      __m256i qi[4];
      for (int i = 0; i < 4; ++i)  // min/max as ordered: a NaN quotient gives 32767, as on the generic path
        qi[i] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_div_ps(v[i], sv), hi), lo));
      // packs interleaves 128-bit halves: (0..3, 8..11, 4..7, 12..15) -> fix with a 64-bit permute
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[0], qi[1]), 0xd8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(qi[2], qi[3]), 0xd8));
    }
    if (p.M > kFusedMaxM) interleave_groups(xq + r * nbp * 32, nbp / 8);  // the panel driver's layout
  }
}

void idot_columns_avx2(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case kQ8_0: idot_columns<kQ8_0>(p, n0, n1); break;
    case kQ4_0: idot_columns<kQ4_0>(p, n0, n1); break;
    default: idot_columns<kQ4_1>(p, n0, n1); break;
  }
}

}  // namespace jserve
