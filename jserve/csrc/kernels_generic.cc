// Portable scalar path: the AVX2 path's recipes (kernels.h) with a separate multiply and add (no
// FMA), so it is row-invariant on any CPU. Built with -ffp-contract=off.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace jserve {
namespace {

inline float tree8(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Dequantizes column n (f32, K-quants) exactly: w[k] = q * d (f32 copies), mv[b] = m_b (Q4_K/Q5_K).
void dequant_column(const Problem& p, int64_t n, float* w, float* mv) {
  const int64_t K = p.K, nb = K / 32;
  if (p.fmt == kF32) {
    const float* src = static_cast<const float*>(p.qs) + n * K;
    for (int64_t k = 0; k < K; ++k) w[k] = src[k];
    return;
  }
  if (is_kquant(p.fmt)) {
    std::vector<float> ds(ds_stride(K));
    kquant_scales(p, n, ds.data(), mv);
    const uint8_t* col = static_cast<const uint8_t*>(p.qs) + n * row_bytes(p.fmt, K);
    for (int64_t b = 0; b < nb; ++b)
      for (int j = 0; j < 32; ++j) {
        const float d = p.fmt == kQ6_K ? ds[2 * b + (j >> 4)] : ds[b];
        w[b * 32 + j] = (float)kquant_q(p.fmt, col, b, j) * d;
      }
  }
}

// Q8_0 / Q4_0 / Q4_1 column n: the integer-dot recipe (kernels.h), every row.
void idot_column(const Problem& p, int64_t n) {
  const int64_t K = p.K, nb = K / 32, nbp = padded_blocks(K);
  std::vector<int16_t> q(K);
  std::vector<float> d(nbp, 0.0f), mv(nbp, 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    d[b] = half_to_float(p.d[n * nb + b]);
    if (p.fmt == kQ8_0) {
      const int8_t* src = static_cast<const int8_t*>(p.qs) + (n * nb + b) * 32;
      for (int j = 0; j < 32; ++j) q[b * 32 + j] = src[j];
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(p.qs) + (n * nb + b) * 16;
      for (int j = 0; j < 16; ++j) {
        q[b * 32 + j] = src[j] & 0xf;
        q[b * 32 + j + 16] = src[j] >> 4;
      }
      mv[b] = p.fmt == kQ4_1 ? half_to_float(p.m[n * nb + b]) : -8.0f * d[b];
    }
  }
  for (int64_t r = 0; r < p.M; ++r) {
    const int16_t* xq = p.xq + r * nbp * 32;
    const float* xs = p.xs + r * nbp;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t b = 0; b < nbp; ++b) {
      int32_t isum = 0;
      if (b < nb)
        for (int j = 0; j < 32; ++j) isum += (int32_t)xq[b * 32 + j] * q[b * 32 + j];
      const float ds = d[b] * xs[b];
      acc[b & 7] = acc[b & 7] + (float)isum * ds;
      if (p.fmt != kQ8_0) acc[b & 7] = acc[b & 7] + p.sx[r * nbp + b] * mv[b];
    }
    p.y[r * p.N + n] = tree8(acc);
  }
}

}  // namespace

void quantize_rows_generic(const Problem& p, int16_t* xq, float* xs) {
  const int64_t K = p.K, nb = K / 32, nbp = padded_blocks(K);
  for (int64_t r = 0; r < p.M; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = p.x + r * K + b * 32;
      uint32_t mx = 0;  // max |x| on the bits: exact, a NaN (or inf) wins
      for (int j = 0; j < 32; ++j) {
        uint32_t u;
        std::memcpy(&u, xb + j, 4);
        mx = std::max(mx, u & 0x7fffffffu);
      }
      float amax;
      std::memcpy(&amax, &mx, 4);
      const float s = amax / 32767.0f;
      xs[r * nbp + b] = s;
      int16_t* out = xq + (r * nbp + b) * 32;
      for (int j = 0; j < 32; ++j) {
        if (s == 0.0f) {
          out[j] = 0;
          continue;
        }
        float v = xb[j] / s;
        v = v < 32767.0f ? v : 32767.0f;  // as x86's minps/maxps: a NaN gives 32767
        v = v > -32767.0f ? v : -32767.0f;
        out[j] = (int16_t)std::lrint(v);
      }
    }
  }
}

void block_sums_generic(const Problem& p, float* sx) {
  const int64_t nb = p.K / 32, nbp = padded_blocks(p.K);
  for (int64_t r = 0; r < p.M; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = p.x + r * p.K + b * 32;
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int j = 0; j < 32; ++j) lanes[j & 7] = lanes[j & 7] + xb[j];
      sx[r * nbp + b] = tree8(lanes);
    }
  }
}

void columns_generic(const Problem& p, int64_t n0, int64_t n1) {
  if (int_dot(p.fmt)) {
    for (int64_t n = n0; n < n1; ++n) idot_column(p, n);
    return;
  }
  const int64_t K = p.K, nbp = padded_blocks(K), N = p.N;
  std::vector<float> w(K), mv(nbp + 1, 0.0f);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_column(p, n, w.data(), mv.data());
    for (int64_t r = 0; r < p.M; ++r) {
      const float* xr = p.x + r * K;
      float acc[16] = {};
      int64_t k = 0;
      for (; k < K; ++k) acc[k & 15] = acc[k & 15] + xr[k] * w[k];
      if (has_offset(p.fmt)) {  // K is a multiple of 32 here: the offsets start at lane 0
        const float* s = p.sx + r * nbp;
        for (int64_t e = 0; e < nbp; ++e) acc[e & 15] = acc[e & 15] + s[e] * mv[e];
      }
      float lanes[8];
      for (int l = 0; l < 8; ++l) lanes[l] = acc[l] + acc[l + 8];
      p.y[r * N + n] = tree8(lanes);
    }
  }
}

}  // namespace jserve
