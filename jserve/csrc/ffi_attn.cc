// XLA FFI handlers for the row-invariant paged attention (attn.h): JserveAttnF32 (a float32 pool) and
// JserveAttnBF16 (bfloat16 stored as uint16 bits). Attributes: isa (0 auto, 1 generic, 2 avx2),
// scale, cap (0: none), window (0: none). Threads from XLA's intra-op pool claim work items
// (row, query, KV head) from an atomic counter, as the matmul handlers claim column chunks: the caller
// works too and waits only for items a helper has claimed; which thread computes an item never
// changes its bits (the reduction over keys is never split).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>

#include "attn.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int jserve_cpu_has_avx2();

namespace jserve {
namespace {

std::atomic<int64_t> g_attn_calls{0};  // handler calls (diagnostics: tests count them)

int64_t attn_env_threads() {
  static const int64_t n = [] {
    const char* s = std::getenv("JSERVE_CPU_KERNEL_THREADS");
    return s ? std::max<int64_t>(0, std::atoll(s)) : 0;
  }();
  return n;
}

struct AttnJob {
  AttnProblem p;
  bool avx2 = false;
  int64_t chunk = 1, nchunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      const int64_t i0 = c * chunk, i1 = std::min(p.R * p.C * p.K, i0 + chunk);
#if defined(JSERVE_HAVE_AVX2)
      if (avx2) {
        attend_items_avx2(p, i0, i1);
      } else {
        attend_items_generic(p, i0, i1);
      }
#else
      attend_items_generic(p, i0, i1);
#endif
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename Buf>
int64_t dim(const Buf& b, int i) { return b.dimensions()[i]; }

template <ffi::DataType T>
ffi::Error attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> pos, ffi::Buffer<T> kp,
                  ffi::Buffer<T> vp, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> slots,
                  ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out, int32_t isa, float scale, float cap,
                  int32_t window) {
  g_attn_calls.fetch_add(1, std::memory_order_relaxed);
  // An empty `layer`: the pools are one layer's [P, K, B, H]; one index l: they are stacked over layers,
  // [L, P, K, B, H], and layer l is read in place (a loop over layers passes the whole stack).
  const int o = layer.element_count() != 0 ? 1 : 0;
  if (layer.element_count() > 1) return ffi::Error::InvalidArgument("jserve attention: layer must hold one index");
  if (q.dimensions().size() != 5 || pos.dimensions().size() != 2 || kp.dimensions().size() != static_cast<size_t>(4 + o) ||
      vp.dimensions().size() != static_cast<size_t>(4 + o) || table.dimensions().size() != 2 || slots.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("jserve attention: bad operand ranks");
  AttnProblem p{};
  p.R = dim(q, 0), p.C = dim(q, 1), p.K = dim(q, 2), p.G = dim(q, 3), p.H = dim(q, 4);
  p.P = dim(kp, o), p.B = dim(kp, o + 2), p.S = dim(table, 0), p.M = dim(table, 1);
  for (int i = 0; i < 4 + o; ++i)
    if (dim(vp, i) != dim(kp, i)) return ffi::Error::InvalidArgument("jserve attention: keys and values differ in shape");
  if (dim(kp, o + 1) != p.K || dim(kp, o + 3) != p.H) return ffi::Error::InvalidArgument("jserve attention: pool [P, K, B, H] does not match q");
  int64_t l = 0;
  if (o) {
    l = layer.typed_data()[0];
    if (l < 0 || l >= dim(kp, 0)) return ffi::Error::InvalidArgument("jserve attention: layer index outside the stack");
  }
  if (dim(pos, 0) != p.R || dim(pos, 1) != p.C || dim(slots, 0) != p.R)
    return ffi::Error::InvalidArgument("jserve attention: positions must be [R, C] and slots [R]");
  if (p.P < 1 || p.S < 1 || p.M < 1 || p.B < 1) return ffi::Error::InvalidArgument("jserve attention: empty pool or table");
  if (out->element_count() != q.element_count()) return ffi::Error::InvalidArgument("jserve attention: bad output shape");
  if (window < 0) return ffi::Error::InvalidArgument("jserve attention: negative window");
  const bool has = jserve_cpu_has_avx2() != 0;
  if (isa == 2 && (!has || p.H % 8 != 0))
    return ffi::Error::InvalidArgument("jserve attention: isa=avx2 needs AVX2+FMA and a head dim that is a multiple of 8");
  const bool avx2 = (isa == 2 || isa == 0) && has && p.H % 8 == 0;
  p.q = q.typed_data();
  p.pos = pos.typed_data();
  p.bf16 = T == ffi::DataType::U16;
  const int64_t layer_bytes = p.P * p.K * p.B * p.H * (p.bf16 ? 2 : 4);
  p.kp = static_cast<const char*>(kp.untyped_data()) + l * layer_bytes;
  p.vp = static_cast<const char*>(vp.untyped_data()) + l * layer_bytes;
  p.table = table.typed_data();
  p.slots = slots.typed_data();
  p.scale = scale;
  p.cap = cap;
  p.window = window;
  p.out = out->typed_data();
  const int64_t n = p.R * p.C * p.K;
  if (n == 0) return ffi::Error::Success();
  // Work estimate: positions seen times G * H (each once for the scores, once for the values).
  int64_t work = 0;
  for (int64_t i = 0; i < p.R * p.C; ++i) {
    const int64_t ps = pos.typed_data()[i];
    if (ps >= 0 && ps < p.M * p.B) work += (p.window > 0 ? std::min<int64_t>(ps + 1, p.window) : ps + 1);
  }
  work *= p.K * p.G * p.H;
  int64_t threads = attn_env_threads();
  if (threads == 0) threads = std::max<int64_t>(1, pool.num_threads());
  auto job = std::make_shared<AttnJob>();
  job->p = p;
  job->avx2 = avx2;
  int64_t nchunks = std::min<int64_t>({8 * threads, n, std::max<int64_t>(1, work >> 16)});
  if (threads == 1) nchunks = 1;
  job->chunk = (n + nchunks - 1) / nchunks;
  job->nchunks = (n + job->chunk - 1) / job->chunk;
  const int64_t helpers = std::min<int64_t>(threads - 1, job->nchunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->nchunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jserve

extern "C" int64_t jserve_attn_calls() { return jserve::g_attn_calls.load(); }

#define JSERVE_ATTN_HANDLER(NAME, T)                                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, jserve::attend<T>,                  \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::Buffer<ffi::F32>>()         \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Arg<ffi::Buffer<T>>()                \
                                    .Arg<ffi::Buffer<T>>()                \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Arg<ffi::Buffer<ffi::S32>>()         \
                                    .Ret<ffi::Buffer<ffi::F32>>()         \
                                    .Attr<int32_t>("isa")                 \
                                    .Attr<float>("scale")                 \
                                    .Attr<float>("cap")                   \
                                    .Attr<int32_t>("window"));

JSERVE_ATTN_HANDLER(JserveAttnF32, ffi::DataType::F32)
JSERVE_ATTN_HANDLER(JserveAttnBF16, ffi::DataType::U16)
