// XLA FFI handlers for the row-invariant matmul kernels (CPU). One target per weight format; the
// attribute `isa` picks the path (0 auto, 1 generic, 2 avx2). Threads from XLA's own intra-op pool
// split output columns into chunks claimed from an atomic counter: the caller works too and waits
// only for chunks a helper has claimed, so a busy or absent pool can never deadlock it, and which
// thread computes a column never changes its bits.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jserve {
namespace {

enum Isa : int32_t { kAuto = 0, kGeneric = 1, kAvx2 = 2 };

bool cpu_has_avx2() {
#if defined(JSERVE_HAVE_AVX2)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

int64_t env_threads() {
  static const int64_t n = [] {
    const char* s = std::getenv("JSERVE_CPU_KERNEL_THREADS");
    return s ? std::max<int64_t>(0, std::atoll(s)) : 0;
  }();
  return n;
}

std::atomic<int64_t> g_helper_chunks{0};  // chunks computed by pool threads (diagnostics)

// What a call does to its input rows before the product and to its output after it, so a layer's
// small elementwise ops run inside the call instead of as separate XLA ops (row-wise, the same
// instructions whatever M, like the product):
//  - kRmsNorm: x <- g * (x * (1 / sqrt(sum(x^2) / K + eps))), the sum over 8 lanes (k mod 8) in
//    increasing k, then ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7));
//  - residual: y <- res + y.
// (SiLU(gate) * up before down was tried too: scalar exp made it slower than XLA's vector op at 8-16 rows.)
enum Pre : int32_t { kNone = 0, kRmsNorm = 1 };

struct Extra {
  int32_t pre = kNone;
  float eps = 0.0f;
  const float* g = nullptr;    // [K] norm weight (kRmsNorm)
  const float* res = nullptr;  // [M, N] or null
};

void rms_norm_rows(const Extra& e, const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = x + r * K;
    float* o = out + r * K;
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = 0; k < K; ++k) l[k & 7] += xr[k] * xr[k];
    const float ss = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    const float inv = 1.0f / std::sqrt(ss / (float)K + e.eps);
    for (int64_t k = 0; k < K; ++k) o[k] = e.g[k] * (xr[k] * inv);
  }
}

struct Job {
  Problem p;
  bool avx2 = false;
  int64_t chunk = 0, nchunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work(bool helper) {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      const int64_t n0 = c * chunk, n1 = std::min(p.N, n0 + chunk);
#if defined(JSERVE_HAVE_AVX2)
      if (avx2) {
        columns_avx2(p, n0, n1);
      } else {
        columns_generic(p, n0, n1);
      }
#else
      columns_generic(p, n0, n1);
#endif
      if (helper) g_helper_chunks.fetch_add(1, std::memory_order_relaxed);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error run(ffi::ThreadPool& pool, Problem p, int32_t isa, const Extra& extra) {
  bool avx2 = false;
  if (isa == kAvx2 && !cpu_has_avx2()) return ffi::Error::InvalidArgument("isa=avx2 requested but unavailable");
  if (isa == kAvx2 || (isa == kAuto && cpu_has_avx2())) avx2 = true;
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  std::vector<float> xin;
  if (extra.pre != kNone) {
    xin.resize(p.M * p.K + 1);
    rms_norm_rows(extra, p.x, p.M, p.K, xin.data());
    p.x = xin.data();
  }
  std::vector<float> sx;
  if (has_offset(p.fmt)) {
    sx.resize(p.M * padded_blocks(p.K) + 1);
#if defined(JSERVE_HAVE_AVX2)
    if (avx2) {
      block_sums_avx2(p, sx.data());
    } else {
      block_sums_generic(p, sx.data());
    }
#else
    block_sums_generic(p, sx.data());
#endif
    p.sx = sx.data();
  }
  std::vector<int16_t> xq;
  std::vector<float> xs;
  if (int_dot(p.fmt)) {  // x quantized per block once per call (kernels.h)
    xq.resize(p.M * padded_blocks(p.K) * 32 + 16);
    xs.resize(p.M * padded_blocks(p.K) + 8);
#if defined(JSERVE_HAVE_AVX2)
    if (avx2) {
      quantize_rows_avx2(p, xq.data(), xs.data());
    } else {
      quantize_rows_generic(p, xq.data(), xs.data());
    }
#else
    quantize_rows_generic(p, xq.data(), xs.data());
#endif
    p.xq = xq.data();
    p.xs = xs.data();
  }
  int64_t threads = env_threads();
  if (threads == 0) threads = std::max<int64_t>(1, pool.num_threads());
  // ~2^17 multiply-adds per chunk at least (~10 us at one row): smaller calls stay on one thread.
  const int64_t macs = p.M * p.N * std::max<int64_t>(p.K, 1);
  int64_t nchunks = std::min<int64_t>({4 * threads, std::max<int64_t>(1, macs >> 17), (p.N + 5) / 6});
  nchunks = std::max<int64_t>(1, threads == 1 ? 1 : nchunks);
  auto job = std::make_shared<Job>();
  job->p = p;
  job->avx2 = avx2;
  job->chunk = ((p.N + nchunks - 1) / nchunks + 5) / 6 * 6;
  job->nchunks = (p.N + job->chunk - 1) / job->chunk;
  const int64_t helpers = std::min<int64_t>(threads - 1, job->nchunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->work(true); });
  job->work(false);
  while (job->done.load(std::memory_order_acquire) < job->nchunks) std::this_thread::yield();
  if (extra.res != nullptr)
    for (int64_t i = 0; i < p.M * p.N; ++i) p.y[i] = extra.res[i] + p.y[i];
  return ffi::Error::Success();
}

template <typename B>
int64_t dim(const B& b, int i) { return b.dimensions()[i]; }

// The prologue/epilogue operands: g (kRmsNorm: [K], or [L, K] with a layer index; else empty),
// res ([M, N] or empty).
ffi::Error extras(int32_t pre, float eps, const ffi::Buffer<ffi::F32>& g, const ffi::Buffer<ffi::F32>& res,
                  int64_t M, int64_t K, int64_t N, int64_t l, Extra* e) {
  if (pre != kNone && pre != kRmsNorm) return ffi::Error::InvalidArgument("jserve matmul: unknown prologue");
  e->pre = pre;
  e->eps = eps;
  if (pre == kRmsNorm) {
    const bool one = g.element_count() == static_cast<size_t>(K);
    const bool stacked = l >= 0 && g.dimensions().size() == 2 && dim(g, 1) == K && l < dim(g, 0);
    if (!one && !stacked) return ffi::Error::InvalidArgument("jserve matmul: norm weight must be [K] (or [L, K] with a layer)");
    e->g = g.typed_data() + (one ? 0 : l * K);
  }
  if (res.element_count() != 0) {
    if (res.element_count() != static_cast<size_t>(M * N)) return ffi::Error::InvalidArgument("jserve matmul: residual must be [M, N]");
    e->res = res.typed_data();
  }
  return ffi::Error::Success();
}

// The weights' layer: an empty `layer` operand means the weight operands are one matrix; a one-element one
// holds l, the weights are stacked over layers (a leading axis L) and layer l is read in place (a loop over
// layers passes the whole stack and its index, so no layer's weights are ever copied). Returns -1 for none.
ffi::Error layer_of(const ffi::Buffer<ffi::S32>& layer, int64_t stack, int64_t* l) {
  *l = -1;
  if (layer.element_count() == 0) return ffi::Error::Success();
  if (layer.element_count() != 1) return ffi::Error::InvalidArgument("jserve matmul: layer must hold one index");
  *l = layer.typed_data()[0];
  if (*l < 0 || *l >= stack) return ffi::Error::InvalidArgument("jserve matmul: layer index outside the stack");
  return ffi::Error::Success();
}

ffi::Error check_blocks(int64_t M, int64_t K, int64_t N, int64_t nb, int64_t per, int64_t y_m, int64_t y_n) {
  if (K != nb * per) return ffi::Error::InvalidArgument("jserve matmul: K must equal block values * blocks");
  if (y_m != M || y_n != N) return ffi::Error::InvalidArgument("jserve matmul: bad output shape");
  return ffi::Error::Success();
}

ffi::Error mm_f32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res,
                  ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                  int32_t pre, float eps) {
  const int o = layer.element_count() != 0 ? 1 : 0;  // the stack's axis, when there is one
  if (x.dimensions().size() != 2 || w.dimensions().size() != static_cast<size_t>(2 + o) || y->dimensions().size() != 2)
    return ffi::Error::InvalidArgument("jserve matmul: bad operand ranks");
  int64_t l = 0;
  ffi::Error err = layer_of(layer, o ? dim(w, 0) : 1, &l);
  if (err.failure()) return err;
  const int64_t M = dim(x, 0), K = dim(x, 1), N = dim(w, o);
  Extra e;
  err = extras(pre, eps, g, res, M, K, N, l, &e);
  if (err.failure()) return err;
  if (dim(w, o + 1) != K || dim(*y, 0) != M || dim(*y, 1) != N)
    return ffi::Error::InvalidArgument("jserve matmul: shapes do not agree");
  const float* wp = w.typed_data() + (o ? l * N * K : 0);
  return run(pool, Problem{kF32, M, N, K, x.typed_data(), wp, nullptr, nullptr, nullptr, y->typed_data()}, isa, e);
}

template <int FMT, ffi::DataType QT>
ffi::Error mm_blocks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res,
                     ffi::Buffer<QT> qs, ffi::Buffer<ffi::F16> d, const uint16_t* m, ffi::Buffer<ffi::S32> layer,
                     ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  const int o = layer.element_count() != 0 ? 1 : 0;
  const bool ranks = x.dimensions().size() == 2 && qs.dimensions().size() == static_cast<size_t>(3 + o) &&
                     d.dimensions().size() == static_cast<size_t>(2 + o) && y->dimensions().size() == 2;
  if (!ranks) return ffi::Error::InvalidArgument("jserve matmul: bad operand ranks");
  int64_t l = 0;
  ffi::Error err = layer_of(layer, o ? dim(qs, 0) : 1, &l);
  if (err.failure()) return err;
  const int64_t M = dim(x, 0), K = dim(x, 1), N = dim(qs, o), nb = dim(qs, o + 1);
  Extra ex;
  err = extras(pre, eps, g, res, M, K, N, l, &ex);
  if (err.failure()) return err;
  const int64_t per_block = is_kquant(FMT) ? kq_width(FMT) : FMT == kQ8_0 ? 32 : 16;
  if (dim(qs, o + 2) != per_block || dim(d, o) != N || dim(d, o + 1) != nb || (o && dim(d, 0) != dim(qs, 0)))
    return ffi::Error::InvalidArgument("jserve matmul: block operand shapes do not agree");
  err = check_blocks(M, K, N, nb, is_kquant(FMT) ? 256 : 32, dim(*y, 0), dim(*y, 1));
  if (err.failure()) return err;
  const int64_t at = o ? l * N * nb : 0;  // the layer's first block
  const auto* dp = reinterpret_cast<const uint16_t*>(d.untyped_data()) + at;
  const auto* qp = static_cast<const uint8_t*>(qs.untyped_data()) + at * per_block;
  return run(pool, Problem{FMT, M, N, K, x.typed_data(), qp, dp, m == nullptr ? nullptr : m + at, nullptr,
                           y->typed_data()}, isa, ex);
}

ffi::Error mm_q8_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::S8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  return mm_blocks<kQ8_0, ffi::S8>(pool, x, g, res, qs, d, nullptr, layer, y, isa, pre, eps);
}

ffi::Error mm_q4_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  return mm_blocks<kQ4_0, ffi::U8>(pool, x, g, res, qs, d, nullptr, layer, y, isa, pre, eps);
}

template <int FMT>
ffi::Error mm_with_m(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                     ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                     int32_t pre, float eps) {
  if (m.dimensions().size() != d.dimensions().size() || m.element_count() != d.element_count())
    return ffi::Error::InvalidArgument("jserve matmul: m must have d's shape");
  for (size_t i = 0; i < d.dimensions().size(); ++i)
    if (dim(m, i) != dim(d, i)) return ffi::Error::InvalidArgument("jserve matmul: m must have d's shape");
  const auto* mp = reinterpret_cast<const uint16_t*>(m.untyped_data());
  return mm_blocks<FMT, ffi::U8>(pool, x, g, res, qs, d, mp, layer, y, isa, pre, eps);
}

ffi::Error mm_q4_1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                   int32_t pre, float eps) {
  return mm_with_m<kQ4_1>(pool, x, g, res, qs, d, m, layer, y, isa, pre, eps);
}

ffi::Error mm_q4_k(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                   int32_t pre, float eps) {
  return mm_with_m<kQ4_K>(pool, x, g, res, qs, d, m, layer, y, isa, pre, eps);
}

ffi::Error mm_q5_k(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                   int32_t pre, float eps) {
  return mm_with_m<kQ5_K>(pool, x, g, res, qs, d, m, layer, y, isa, pre, eps);
}

ffi::Error mm_q6_k(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  return mm_blocks<kQ6_K, ffi::U8>(pool, x, g, res, qs, d, nullptr, layer, y, isa, pre, eps);
}

}  // namespace
}  // namespace jserve

extern "C" int jserve_cpu_has_avx2() { return jserve::cpu_has_avx2() ? 1 : 0; }
extern "C" int64_t jserve_cpu_helper_chunks() { return jserve::g_helper_chunks.load(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JserveMatmulF32, jserve::mm_f32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("pre")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JserveMatmulQ8_0, jserve::mm_q8_0,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("pre")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JserveMatmulQ4_0, jserve::mm_q4_0,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("pre")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JserveMatmulQ4_1, jserve::mm_q4_1,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("pre")
                                  .Attr<float>("eps"));

#define JSERVE_WITH_M_HANDLER(NAME, FN)                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, FN,               \
                                ffi::Ffi::Bind()        \
                                    .Ctx<ffi::ThreadPool>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::U8>>() \
                                    .Arg<ffi::Buffer<ffi::F16>>() \
                                    .Arg<ffi::Buffer<ffi::F16>>() \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int32_t>("isa") \
                                    .Attr<int32_t>("pre") \
                                    .Attr<float>("eps"));

JSERVE_WITH_M_HANDLER(JserveMatmulQ4_K, jserve::mm_q4_k)
JSERVE_WITH_M_HANDLER(JserveMatmulQ5_K, jserve::mm_q5_k)

XLA_FFI_DEFINE_HANDLER_SYMBOL(JserveMatmulQ6_K, jserve::mm_q6_k,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("pre")
                                  .Attr<float>("eps"));

namespace jserve {
namespace {

// A zeroed buffer whose pages that are already zero are only read, never written: a large buffer fresh
// from the allocator is untouched memory the kernel maps on first write, and reading it maps the shared
// zero page, so a KV pool made this way becomes resident page by page as sequences write it (as
// llama.cpp's does) instead of all at once. Smaller or reused buffers get the bytes that are not zero
// cleared: the result is all zeros either way.
ffi::Error lazy_zeros(ffi::Result<ffi::AnyBuffer> out) {
  char* p = static_cast<char*>(out->untyped_data());
  const size_t n = out->size_bytes();
  constexpr size_t kPage = 4096;
  for (size_t i = 0; i < n; i += kPage) {
    const size_t m = std::min(kPage, n - i);
    const char* q = p + i;
    bool zero = true;
    size_t j = 0;
    for (; j + 8 <= m && zero; j += 8) {
      uint64_t w;
      std::memcpy(&w, q + j, 8);
      zero = w == 0;
    }
    for (; j < m && zero; ++j) zero = q[j] == 0;
    if (!zero) std::memset(p + i, 0, m);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jserve

XLA_FFI_DEFINE_HANDLER_SYMBOL(JserveLazyZeros, jserve::lazy_zeros, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
