// Row-invariant matmul kernels: y[M, N] = x[M, K] @ W^T, W [N, K] in f32 or a GGUF block format.
//
// Every output y[r, n] is computed by one fixed arithmetic recipe for its format, whatever M is and
// whatever the other rows hold. Threads split output columns only. The AVX2 and generic paths differ
// in rounding (FMA against mul then add), not in structure.
//
// Q8_0, Q4_0, Q4_1 (integer dot): each row of x is first quantized per 32-value block b, once per
// call: s_b = max_j |x_j| / 32767 (float division), xq_j = round-to-nearest-even(clamp(x_j / s_b,
// +-32767)) as int16 (xq = 0 where s_b = 0; a NaN or inf in the block makes s_b NaN or inf, so it
// reaches y). Then per block isum_b = sum_j xq_j q_j, exact in int32 (q the int8 quant, or the
// unsigned nibble 0..15 of Q4_0/Q4_1), and 8 float lanes (lane = b mod 8, blocks in increasing b,
// zero-padded to a multiple of 8 blocks) take acc = acc + float(isum_b) * (d_b * s_b), then for
// Q4_0/Q4_1 acc = acc + sx_b * m_b (sx_b = float sum of x over block b, m_b = m or -8 d); then one
// fixed reduction tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). Error against exact
// arithmetic: |x_j - s_b xq_j| <= s_b / 2 (+ float rounding), i.e. |dy| <= sum_b s_b / 2 sum_j |q_j d_b|.
//
// f32 and the K-quants: 16 lanes (lane l sums x[k] w[k] over k = 16t + l in increasing t, from zero;
// FMA on AVX2, mul then add on the generic path) over the exactly dequantized weights; Q4_K/Q5_K then
// continue the same lanes over their offset terms sx_b * (-dmin * m_b) (m_b the 6-bit minimum of
// 32-value sub-block b, zero-padded to a multiple of 8 blocks); then lanes l + l+8 and the tree above.
// K-quants (256-value super-blocks, one f16 d per super-block; see kquant_scales): w = q * (d * sc)
// exact (Q4_K/Q5_K: <= 5 quant bits x 6 scale bits x an 11-bit mantissa; Q6_K: (q - 32) x int8
// scale x mantissa <= 23 bits).
#pragma once
#include <cstdint>

namespace jserve {

enum Format : int { kF32 = 0, kQ8_0 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ4_K = 4, kQ5_K = 5, kQ6_K = 6 };

struct Problem {
  int fmt;
  int64_t M, N, K;         // rows, output columns, reduction length
  const float* x;          // [M, K]
  const void* qs;          // f32 [N, K] | int8 [N, K/32, 32] | uint8 [N, K/32, 16] | uint8 [N, K/256, kq_width]
  const uint16_t* d;       // f16 [N, K/32] (block formats) | [N, K/256] (K-quants)
  const uint16_t* m;       // f16 [N, K/32] (Q4_1) | dmin [N, K/256] (Q4_K, Q5_K)
  const float* sx;         // [M, padded_blocks(K)] sums of x per block, zero padded (Q4_0/Q4_1)
  float* y;                // [M, N]
  const int16_t* xq = nullptr;  // [M, padded_blocks(K) * 32] x quantized per block (int_dot formats)
  const float* xs = nullptr;    // [M, padded_blocks(K)] their scales s_b, zero padded
};

inline bool has_offset(int fmt) { return fmt == kQ4_0 || fmt == kQ4_1 || fmt == kQ4_K || fmt == kQ5_K; }
inline bool is_kquant(int fmt) { return fmt >= kQ4_K; }
inline bool int_dot(int fmt) { return fmt == kQ8_0 || fmt == kQ4_0 || fmt == kQ4_1; }

// Bytes per K-quant super-block left in qs once d (and dmin) are split off (ggml's block minus them):
// Q4_K scales[12] qs[128]; Q5_K scales[12] qh[32] qs[128]; Q6_K ql[128] qh[64] scales[16] (int8).
inline int64_t kq_width(int fmt) { return fmt == kQ4_K ? 140 : fmt == kQ5_K ? 172 : 208; }

// Bytes of qs per output column.
inline int64_t row_bytes(int fmt, int64_t K) {
  if (is_kquant(fmt)) return K / 256 * kq_width(fmt);
  return fmt == kF32 ? 4 * K : K / 32 * (fmt == kQ8_0 ? 32 : 16);
}

// Scale slots per column: one per 32-value block, two for Q6_K (16-value sub-blocks), padded.
inline int64_t ds_stride(int64_t K) { return 2 * (((K / 32) + 7) & ~int64_t{7}); }

// Blocks per row rounded up to a multiple of 8 (one vector of offsets).
inline int64_t padded_blocks(int64_t K) { return ((K / 32) + 7) & ~int64_t{7}; }

// block_sums_*: sx [M, padded_blocks(K)] (zeroed by the caller) = sums of x per block, fixed order.
// quantize_rows_*: xq [M, padded_blocks(K), 32], xs [M, padded_blocks(K)] (zeroed by the caller) for
// the int_dot formats; both paths give the same integers and scales. The AVX2 path stores each row's
// xq for its own kernels: in block order for M <= 4, above that per group of 8 blocks as 16 vectors of
// int16 pairs, pair t of block l in int32 lane l of vector t (so madd + add leave block sums in lanes).
// Generic C++ (any CPU).
void block_sums_generic(const Problem& p, float* sx);
void quantize_rows_generic(const Problem& p, int16_t* xq, float* xs);
void columns_generic(const Problem& p, int64_t n0, int64_t n1);

// AVX2 + FMA + F16C (x86-64 only; compiled with -mavx2 -mfma -mf16c).
void block_sums_avx2(const Problem& p, float* sx);
void quantize_rows_avx2(const Problem& p, int16_t* xq, float* xs);
void columns_avx2(const Problem& p, int64_t n0, int64_t n1);
void idot_columns_avx2(const Problem& p, int64_t n0, int64_t n1);  // int_dot formats (kernels_idot_avx2.cc)

inline float half_to_float(uint16_t h);

// Column n's K-quant scales, exact: ds[s] = d * sc_s per scale slot s (32-value block b, or 16-value
// half b2 = 2b + i for Q6_K), mv[b] = -dmin * m_b (Q4_K/Q5_K; untouched for Q6_K).
inline void kquant_scales(const Problem& p, int64_t n, float* ds, float* mv) {
  const int64_t ns = p.K / 256, w = kq_width(p.fmt);
  const uint8_t* col = static_cast<const uint8_t*>(p.qs) + n * ns * w;
  for (int64_t s = 0; s < ns; ++s) {
    const uint8_t* blk = col + s * w;
    const float d = half_to_float(p.d[n * ns + s]);
    if (p.fmt == kQ6_K) {
      for (int i = 0; i < 16; ++i) ds[16 * s + i] = d * (float)(int8_t)blk[192 + i];
      continue;
    }
    const float dmin = half_to_float(p.m[n * ns + s]);
    for (int j = 0; j < 8; ++j) {  // ggml's get_scale_min_k4 over scales[12]
      const uint8_t* q = blk;
      const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
      const int mn = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
      ds[8 * s + j] = d * (float)sc;
      mv[8 * s + j] = dmin * (float)(-mn);
    }
  }
}

// The integer quant (Q6_K: minus 32) of element j (< 32) of 32-value block b of a K-quant column.
inline int kquant_q(int fmt, const uint8_t* col, int64_t b, int j) {
  const int64_t s = b >> 3;
  const int t = (int)(b & 7);
  if (fmt == kQ6_K) {
    const uint8_t* blk = col + s * 208;
    const int h = t >> 2, qq = t & 3;
    const uint8_t l = blk[64 * h + 32 * (qq & 1) + j];
    const int lo = qq >= 2 ? l >> 4 : l & 0xf;
    const int hi = (blk[128 + 32 * h + j] >> (2 * qq)) & 3;
    return (lo | (hi << 4)) - 32;
  }
  const int64_t w = kq_width(fmt);
  const uint8_t* blk = col + s * w;
  const uint8_t* ql = blk + (fmt == kQ4_K ? 12 : 44) + 32 * (t >> 1);
  int q = (ql[j] >> (4 * (t & 1))) & 0xf;
  if (fmt == kQ5_K) q |= ((blk[12 + j] >> t) & 1) << 4;
  return q;
}

// IEEE half -> float, exact (subnormals, inf, nan).
inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace jserve
