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

// The prologue/epilogue operands: g (kRmsNorm: [K], else empty), res ([M, N] or empty).
ffi::Error extras(int32_t pre, float eps, const ffi::Buffer<ffi::F32>& g, const ffi::Buffer<ffi::F32>& res,
                  int64_t M, int64_t K, int64_t N, Extra* e) {
  if (pre != kNone && pre != kRmsNorm) return ffi::Error::InvalidArgument("jserve matmul: unknown prologue");
  e->pre = pre;
  e->eps = eps;
  if (pre == kRmsNorm) {
    if (g.element_count() != static_cast<size_t>(K)) return ffi::Error::InvalidArgument("jserve matmul: norm weight must be [K]");
    e->g = g.typed_data();
  }
  if (res.element_count() != 0) {
    if (res.element_count() != static_cast<size_t>(M * N)) return ffi::Error::InvalidArgument("jserve matmul: residual must be [M, N]");
    e->res = res.typed_data();
  }
  return ffi::Error::Success();
}

ffi::Error check_blocks(int64_t M, int64_t K, int64_t N, int64_t nb, int64_t per, int64_t y_m, int64_t y_n) {
  if (K != nb * per) return ffi::Error::InvalidArgument("jserve matmul: K must equal block values * blocks");
  if (y_m != M || y_n != N) return ffi::Error::InvalidArgument("jserve matmul: bad output shape");
  return ffi::Error::Success();
}

ffi::Error mm_f32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res,
                  ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  if (x.dimensions().size() != 2 || w.dimensions().size() != 2 || y->dimensions().size() != 2)
    return ffi::Error::InvalidArgument("jserve matmul: bad operand ranks");
  const int64_t M = dim(x, 0), K = dim(x, 1), N = dim(w, 0);
  Extra e;
  ffi::Error err = extras(pre, eps, g, res, M, K, N, &e);
  if (err.failure()) return err;
  if (dim(w, 1) != K || dim(*y, 0) != M || dim(*y, 1) != N)
    return ffi::Error::InvalidArgument("jserve matmul: shapes do not agree");
  return run(pool, Problem{kF32, M, N, K, x.typed_data(), w.typed_data(), nullptr, nullptr, nullptr, y->typed_data()},
             isa, e);
}

template <int FMT, ffi::DataType QT>
ffi::Error mm_blocks(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res,
                     ffi::Buffer<QT> qs, ffi::Buffer<ffi::F16> d, const uint16_t* m, ffi::ResultBuffer<ffi::F32> y,
                     int32_t isa, int32_t pre, float eps) {
  const bool ranks = x.dimensions().size() == 2 && qs.dimensions().size() == 3 && d.dimensions().size() == 2 &&
                     y->dimensions().size() == 2;
  if (!ranks) return ffi::Error::InvalidArgument("jserve matmul: bad operand ranks");
  const int64_t M = dim(x, 0), K = dim(x, 1), N = dim(qs, 0), nb = dim(qs, 1);
  Extra ex;
  ffi::Error err = extras(pre, eps, g, res, M, K, N, &ex);
  if (err.failure()) return err;
  const int64_t per_block = is_kquant(FMT) ? kq_width(FMT) : FMT == kQ8_0 ? 32 : 16;
  if (dim(qs, 2) != per_block || dim(d, 0) != N || dim(d, 1) != nb)
    return ffi::Error::InvalidArgument("jserve matmul: block operand shapes do not agree");
  ffi::Error e = check_blocks(M, K, N, nb, is_kquant(FMT) ? 256 : 32, dim(*y, 0), dim(*y, 1));
  if (e.failure()) return e;
  const auto* dp = reinterpret_cast<const uint16_t*>(d.untyped_data());
  return run(pool, Problem{FMT, M, N, K, x.typed_data(), qs.untyped_data(), dp, m, nullptr, y->typed_data()}, isa,
             ex);
}

ffi::Error mm_q8_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::S8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  return mm_blocks<kQ8_0, ffi::S8>(pool, x, g, res, qs, d, nullptr, y, isa, pre, eps);
}

ffi::Error mm_q4_0(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  return mm_blocks<kQ4_0, ffi::U8>(pool, x, g, res, qs, d, nullptr, y, isa, pre, eps);
}

template <int FMT>
ffi::Error mm_with_m(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                     ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                     int32_t pre, float eps) {
  if (m.dimensions().size() != 2 || d.dimensions().size() != 2 || dim(m, 0) != dim(d, 0) || dim(m, 1) != dim(d, 1))
    return ffi::Error::InvalidArgument("jserve matmul: m must have d's shape");
  const auto* mp = reinterpret_cast<const uint16_t*>(m.untyped_data());
  return mm_blocks<FMT, ffi::U8>(pool, x, g, res, qs, d, mp, y, isa, pre, eps);
}

ffi::Error mm_q4_1(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                   int32_t pre, float eps) {
  return mm_with_m<kQ4_1>(pool, x, g, res, qs, d, m, y, isa, pre, eps);
}

ffi::Error mm_q4_k(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                   int32_t pre, float eps) {
  return mm_with_m<kQ4_K>(pool, x, g, res, qs, d, m, y, isa, pre, eps);
}

ffi::Error mm_q5_k(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::Buffer<ffi::F16> m, ffi::ResultBuffer<ffi::F32> y, int32_t isa,
                   int32_t pre, float eps) {
  return mm_with_m<kQ5_K>(pool, x, g, res, qs, d, m, y, isa, pre, eps);
}

ffi::Error mm_q6_k(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> res, ffi::Buffer<ffi::U8> qs,
                   ffi::Buffer<ffi::F16> d, ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t pre, float eps) {
  return mm_blocks<kQ6_K, ffi::U8>(pool, x, g, res, qs, d, nullptr, y, isa, pre, eps);
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("pre")
                                  .Attr<float>("eps"));
