// Paged attention, AVX2 + FMA path (attn.h's recipe; H a multiple of 8). Scores of 8 keys at once
// reduce their lanes through one hadd tree that gives each key ((l0 + l1) + (l2 + l3)) + ((l4 + l5) +
// (l6 + l7)), the same bits as a single key's scalar tree, so which keys share a batch never
// matters. exp is a vector polynomial (exp8), used lane-wise for p and on a broadcast for alpha.
// Built with -ffp-contract=off -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attn.h"

namespace jserve {
namespace {

// e^x for x <= 0 (softmax arguments), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6
// polynomial, times 2^n; below -87.33 (e^x under float32's least normal) exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.37626f));
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
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(tiny, y);
}

inline float exp1(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

inline float tree8(const float* l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

template <bool BF16>
inline __m256 load8(const void* base, int64_t off) {
  if constexpr (BF16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(base) + off);
  }
}

// Lane sums of q . k for one key.
template <bool BF16>
inline __m256 dot_lanes(const float* q, const void* kp, int64_t off, int64_t H) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; h += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + h), load8<BF16>(kp, off + h), a);
  return a;
}

// Scores of keys j .. j+7 (rows at off, off + H, ...): lane i = key j + i's tree8.
template <bool BF16>
inline __m256 scores8(const float* q, const void* kp, int64_t off, int64_t H) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; h += 8) {
    const __m256 qv = _mm256_loadu_ps(q + h);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8<BF16>(kp, off + i * H + h), a[i]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// acc[0 : 8 NV] = acc * alpha + sum over seen j (increasing) of p_j v_j[0 : 8 NV], NV vectors in registers.
template <int NV, bool BF16>
inline void pv_block(float* a, __m256 av, const float* pr, const void* vp, int64_t off, int64_t jlo, int64_t jhi,
                     int64_t H) {
  __m256 c[NV];
  for (int t = 0; t < NV; ++t) c[t] = _mm256_mul_ps(_mm256_loadu_ps(a + 8 * t), av);
  for (int64_t j = jlo; j <= jhi; ++j) {
    const __m256 pj = _mm256_set1_ps(pr[j]);
    const int64_t vo = off + j * H;
    for (int t = 0; t < NV; ++t) c[t] = _mm256_fmadd_ps(pj, load8<BF16>(vp, vo + 8 * t), c[t]);
  }
  for (int t = 0; t < NV; ++t) _mm256_storeu_ps(a + 8 * t, c[t]);
}

template <bool BF16>
void items(const AttnProblem& p, int64_t i0, int64_t i1) {
  const int64_t H = p.H, G = p.G, B = p.B;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t bpad = (B + 7) / 8 * 8 + 8;
  std::vector<float> qs(G * H), acc(G * H), m(G), denom(G), s(bpad, 0.0f), pr(bpad, 0.0f);
  alignas(32) float lanes[8];
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
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
        int64_t j = jlo;
        for (; j + 8 <= jhi + 1; j += 8) _mm256_storeu_ps(s.data() + j, scores8<BF16>(qg, p.kp, off + j * H, H));
        for (; j <= jhi; ++j) {
          _mm256_store_ps(lanes, dot_lanes<BF16>(qg, p.kp, off + j * H, H));
          s[j] = tree8(lanes);
        }
        if (p.cap != 0.0f)
          for (j = jlo; j <= jhi; ++j) s[j] = p.cap * std::tanh(s[j] / p.cap);
        // The page's largest score (exact whatever the order): lanes, unseen keys as -inf.
        const __m256i lo = _mm256_set1_epi32((int32_t)jlo - 1), hi = _mm256_set1_epi32((int32_t)jhi + 1);
        __m256 mxv = _mm256_set1_ps(ninf);
        for (int64_t j0 = jlo & ~int64_t{7}; j0 <= jhi; j0 += 8) {
          const __m256i jv = _mm256_add_epi32(iota, _mm256_set1_epi32((int32_t)j0));
          const __m256 seen = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(jv, lo), _mm256_cmpgt_epi32(hi, jv)));
          mxv = _mm256_max_ps(mxv, _mm256_blendv_ps(_mm256_set1_ps(ninf), _mm256_loadu_ps(s.data() + j0), seen));
        }
        _mm256_store_ps(lanes, mxv);
        float mx = ninf;
        for (int l = 0; l < 8; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
        const float mn = m[g] > mx ? m[g] : mx;
        const float alpha = m[g] == ninf ? 0.0f : exp1(m[g] - mn);
        const __m256 mv = _mm256_set1_ps(mn);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j0 = jlo & ~int64_t{7}; j0 <= jhi; j0 += 8) {
          const __m256i jv = _mm256_add_epi32(iota, _mm256_set1_epi32((int32_t)j0));
          const __m256 seen = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(jv, lo), _mm256_cmpgt_epi32(hi, jv)));
          const __m256 e = _mm256_and_ps(seen, exp8(_mm256_sub_ps(_mm256_loadu_ps(s.data() + j0), mv)));
          _mm256_storeu_ps(pr.data() + j0, e);
          sum = _mm256_add_ps(sum, e);
        }
        _mm256_store_ps(lanes, sum);
        denom[g] = denom[g] * alpha + tree8(lanes);
        m[g] = mn;
        const __m256 av = _mm256_set1_ps(alpha);
        float* a = acc.data() + g * H;
        int64_t h0 = 0;
        for (; h0 + 64 <= H; h0 += 64) pv_block<8, BF16>(a + h0, av, pr.data(), p.vp, off + h0, jlo, jhi, H);
        for (; h0 < H; h0 += 8) pv_block<1, BF16>(a + h0, av, pr.data(), p.vp, off + h0, jlo, jhi, H);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const __m256 d = _mm256_set1_ps(denom[g]);
      for (int64_t h = 0; h < H; h += 8)
        _mm256_storeu_ps(out + g * H + h, _mm256_div_ps(_mm256_loadu_ps(acc.data() + g * H + h), d));
    }
  }
}

}  // namespace

void attend_items_avx2(const AttnProblem& p, int64_t i0, int64_t i1) {
  if (p.bf16) {
    items<true>(p, i0, i1);
  } else {
    items<false>(p, i0, i1);
  }
}

}  // namespace jserve
