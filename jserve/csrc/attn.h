// Row-invariant paged attention (CPU): queries against a page pool through a page table.
//
// One work item is (row r, query c, KV head k): its G query heads against slot slots[r]'s pages.
// A query at position pos reads exactly the pages from the one holding its window's first position
// (0 without a window) to pos / B, in increasing order, and in each page only the keys it sees
// (kpos <= pos and kpos > pos - window). Its result is a function of pos, the spec and those keys'
// bits alone, by one fixed recipe, so it is bitwise the same whatever the call (decode or extend),
// its batch, its neighbours or the caller's n_blocks:
//  - q' = q * scale (float32);
//  - score of key j: 8 lanes (lane l sums q'[h] k[h] over h = 8t + l in increasing t, from zero;
//    FMA on AVX2, mul then add on the generic path), then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) +
//    (l6 + l7)); with a soft cap, cap * tanh(score / cap) (std::tanh);
//  - per page, online softmax: m' = max(m, max of the page's scores); alpha = exp(m - m') (0 on the
//    first page); p_j = exp(score_j - m'); page sum = 8 lanes (lane j mod 8, increasing j, unseen
//    keys adding +0), reduced as the scores are; denom = denom * alpha + page sum;
//    acc = acc * alpha, then acc += p_j v_j for the seen j in increasing order;
//  - out = acc / denom.
// exp is a polynomial (Cephes' expf, |error| ~1 ulp) on AVX2 and std::exp on the generic path. A
// query whose position is negative or at or past the table (M * B: padding, inactive slots) gives
// zeros and reads nothing. Page indices are clamped into the pool (as the XLA path's reads are);
// slots into the table.
#pragma once
#include <cstdint>

namespace jserve {

struct AttnProblem {
  int64_t R, C, K, G, H;  // rows, queries per row, KV heads, query heads per KV head, head dim
  int64_t P, B, S, M;     // pages, positions per page, table rows (slots), table columns
  const float* q;         // [R, C, K, G, H]
  const int32_t* pos;     // [R, C]
  const void* kp;         // [P, K, B, H] float32, or bfloat16 bits (uint16)
  const void* vp;
  bool bf16;
  const int32_t* table;   // [S, M]
  const int32_t* slots;   // [R]
  float scale, cap;       // cap 0: no soft cap
  int32_t window;         // 0: none
  float* out;             // [R, C, K, G, H]
};

// Items [i0, i1) of R * C * K (item = (r * C + c) * K + k).
void attend_items_generic(const AttnProblem& p, int64_t i0, int64_t i1);
void attend_items_avx2(const AttnProblem& p, int64_t i0, int64_t i1);

// The pages a query at `pos` reads: [first, last]; false when it reads nothing (zeros).
inline bool attn_pages(const AttnProblem& p, int64_t pos, int64_t* first, int64_t* last, int64_t* lo_pos) {
  if (pos < 0 || pos >= p.M * p.B) return false;
  int64_t lo = 0;
  if (p.window > 0) lo = pos - p.window + 1 > 0 ? pos - p.window + 1 : 0;
  *lo_pos = lo;
  *first = lo / p.B;
  *last = pos / p.B;
  return true;
}

// Page i of slot s (table row clamped into [0, S), page into [0, P)).
inline int64_t attn_page(const AttnProblem& p, int64_t slot, int64_t i) {
  if (slot < 0) slot = 0;
  if (slot >= p.S) slot = p.S - 1;
  int64_t page = p.table[slot * p.M + i];
  if (page >= p.P) page = p.P - 1;
  if (page < 0) page = 0;
  return page;
}

}  // namespace jserve
