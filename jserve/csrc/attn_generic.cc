// Paged attention, portable C++ (any CPU): attn.h's recipe with mul then add and std::exp.
// Built with -ffp-contract=off, so no multiply-add is fused behind the recipe's back.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attn.h"

namespace jserve {
namespace {

inline float widen_bits(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Row j of a [B, H] page block as float32 into `dst`.
inline const float* key_row(const AttnProblem& p, const void* base, int64_t off, float* dst) {
  if (!p.bf16) return static_cast<const float*>(base) + off;
  const uint16_t* s = static_cast<const uint16_t*>(base) + off;
  for (int64_t h = 0; h < p.H; ++h) dst[h] = widen_bits(s[h]);
  return dst;
}

inline float tree8(const float* l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

}  // namespace

void attend_items_generic(const AttnProblem& p, int64_t i0, int64_t i1) {
  const int64_t H = p.H, G = p.G, B = p.B;
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> qs(G * H), acc(G * H), m(G), denom(G), s(B), pr(B), krow(H), vrow(H);
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t kh = item % p.K, rc = item / p.K, r = rc / p.C;
    float* out = p.out + item * G * H;
    int64_t first, last, lo_pos;
    if (!attn_pages(p, p.pos[rc], &first, &last, &lo_pos)) {
      std::memset(out, 0, sizeof(float) * G * H);
      continue;
    }
    const int64_t pos = p.pos[rc];
    const float* q = p.q + item * G * H;
    for (int64_t i = 0; i < G * H; ++i) qs[i] = q[i] * p.scale;
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), ninf);
    std::fill(denom.begin(), denom.end(), 0.0f);
    for (int64_t i = first; i <= last; ++i) {
      const int64_t off = (attn_page(p, p.slots[r], i) * p.K + kh) * B * H;
      const int64_t jlo = lo_pos > i * B ? lo_pos - i * B : 0;
      const int64_t jhi = pos - i * B < B - 1 ? pos - i * B : B - 1;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qs.data() + g * H;
        float mx = ninf;
        for (int64_t j = jlo; j <= jhi; ++j) {
          const float* k = key_row(p, p.kp, off + j * H, krow.data());
          float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t h = 0; h < H; ++h) l[h & 7] = l[h & 7] + qg[h] * k[h];
          float sc = tree8(l);
          if (p.cap != 0.0f) sc = p.cap * std::tanh(sc / p.cap);
          s[j] = sc;
          mx = sc > mx ? sc : mx;
        }
        const float mn = m[g] > mx ? m[g] : mx;
        const float alpha = m[g] == ninf ? 0.0f : std::exp(m[g] - mn);
        float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = jlo; j <= jhi; ++j) {
          pr[j] = std::exp(s[j] - mn);
          l[j & 7] = l[j & 7] + pr[j];
        }
        denom[g] = denom[g] * alpha + tree8(l);
        m[g] = mn;
        float* a = acc.data() + g * H;
        for (int64_t h = 0; h < H; ++h) a[h] = a[h] * alpha;
        for (int64_t j = jlo; j <= jhi; ++j) {
          const float* v = key_row(p, p.vp, off + j * H, vrow.data());
          for (int64_t h = 0; h < H; ++h) a[h] = a[h] + pr[j] * v[h];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t h = 0; h < H; ++h) out[g * H + h] = acc[g * H + h] / denom[g];
  }
}

}  // namespace jserve
