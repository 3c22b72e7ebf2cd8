// Row-invariant matmul kernels: y[M, N] = x[M, K] @ W^T, W [N, K] in f32 or a GGUF block format.
//
// Every output y[r, n] is computed by one fixed arithmetic recipe, whatever M is and whatever the
// other rows hold: 16 lanes (lane l sums x[k] w[k] over k = 16t + l in increasing t, from zero; FMA
// on AVX2, mul then add on the generic path) over the exactly dequantized weights w = q * d (exact
// in float32: <= 8 integer bits times an 11-bit half mantissa); Q4_0/Q4_1 then continue the same
// lanes over the offset terms sx_b * m_b (sx_b = sum of x over block b, m_b = m or -8 d, both
// zero-padded to a multiple of 8 blocks); then one fixed reduction tree (lanes l + l+8, then pairs
// 4 apart, 2 apart, 1 apart). Threads split output columns only. The AVX2 and generic paths differ
// in rounding (FMA), not in structure.
#pragma once
#include <cstdint>

namespace jserve {

enum Format : int { kF32 = 0, kQ8_0 = 1, kQ4_0 = 2, kQ4_1 = 3 };

struct Problem {
  int fmt;
  int64_t M, N, K;         // rows, output columns, reduction length
  const float* x;          // [M, K]
  const void* qs;          // f32 [N, K] | int8 [N, K/32, 32] | uint8 [N, K/32, 16]
  const uint16_t* d;       // f16 [N, K/32] (block formats)
  const uint16_t* m;       // f16 [N, K/32] (Q4_1 only)
  const float* sx;         // [M, padded_blocks(K)] sums of x per block, zero padded (Q4_0/Q4_1)
  float* y;                // [M, N]
};

inline bool has_offset(int fmt) { return fmt == kQ4_0 || fmt == kQ4_1; }

// Blocks per row rounded up to a multiple of 8 (one vector of offsets).
inline int64_t padded_blocks(int64_t K) { return ((K / 32) + 7) & ~int64_t{7}; }

// block_sums_*: sx [M, padded_blocks(K)] (zeroed by the caller) = sums of x per block, fixed order.
// Generic C++ (any CPU).
void block_sums_generic(const Problem& p, float* sx);
void columns_generic(const Problem& p, int64_t n0, int64_t n1);

// AVX2 + FMA + F16C (x86-64 only; compiled with -mavx2 -mfma -mf16c).
void block_sums_avx2(const Problem& p, float* sx);
void columns_avx2(const Problem& p, int64_t n0, int64_t n1);

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
