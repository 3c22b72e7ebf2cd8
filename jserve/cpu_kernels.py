"""Row-invariant matmul and paged-attention kernels for CPU, called through XLA's FFI.

`matmul(x, fmt, qs, d, m)` computes y[..., N] = x[..., K] @ W^T for W [N, K] given as float32 or in
a GGUF block format, multiplied in place (never dequantized to a float32 copy):

- ``f32``:  qs float32 [N, K] (any K);
- ``q8_0``: qs int8 [N, K/32, 32], d float16 [N, K/32]; w = q * d;
- ``q4_0``: qs uint8 [N, K/32, 16], d float16 [N, K/32]; byte j holds element j (low nibble) and
  element j + 16 (high nibble); w = (nibble - 8) * d;
- ``q4_1``: as q4_0 plus m float16 [N, K/32]; w = nibble * d + m;
- ``q4_k``, ``q5_k``, ``q6_k`` (GGUF's K-quants, 256-value super-blocks): qs uint8 [N, K/256, W] holds
  each ggml super-block's bytes with its float16 d (and dmin) taken out, d float16 [N, K/256] and, for
  q4_k / q5_k, m = dmin float16 [N, K/256]. W = 140 for q4_k (scales[12] qs[128]), 172 for q5_k
  (scales[12] qh[32] qs[128]), 208 for q6_k (ql[128] qh[64] int8 scales[16]); ggml's formulas:
  w = d * sc * q - dmin * mn (q4_k / q5_k, 6-bit sc and mn per 32 values), w = d * sc * (q - 32)
  (q6_k, int8 sc per 16 values).

q8_0, q4_0 and q4_1 multiply integers: each row of x is quantized per 32-value block to int16 (scale
max|x_b| / 32767, once per call) and each block's dot with the weight quants is an exact int32 sum,
then scaled by d * s in float32 (``csrc/kernels.h`` states the recipe and its error bound: a relative
step of 1/65534 of the block's largest |x|). f32 and the K-quants multiply float32 by the exactly
dequantized weights.

`paged_attention(q, positions, k, v, table, slots, ...)` is attention over a KV page pool (float32 or
bfloat16 bits) through a page table, each query reading only its own pages by one fixed recipe
(``csrc/attn.h``), so a query's bits depend on its position and keys alone: ``jserve.attention``
calls it from the decode step and ``extend`` (``JSERVE_CPU_ATTENTION=0`` keeps XLA's loops).

Each output row is computed by one fixed instruction sequence whatever the number of rows M and
whatever the other rows hold (threads split output columns, never the reduction over K), so a row's
bits do not depend on its batch. The C++ sources live in ``jserve/csrc``; the shared library is built
by ``python -m jserve.cpu_kernels build`` (set-up) or, when missing or older than its sources, on
first use. Paths: ``avx2`` (AVX2 + FMA + F16C, chosen at run time) and ``generic`` (portable C++,
used only when asked for: ``JSERVE_CPU_KERNEL_ISA=generic``). Where neither can run, `available()` is
False, `describe()` says why and callers keep the XLA path. Importing this module does no work.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax
    import numpy as np

FORMATS = ("f32", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
KQUANTS = ("q4_k", "q5_k", "q6_k")
# Bytes per K-quant super-block kept in qs: the ggml block minus its float16 d (and dmin).
KQ_WIDTH = {"q4_k": 140, "q5_k": 172, "q6_k": 208}
WITH_M = ("q4_1", "q4_k", "q5_k")
ISAS = ("auto", "generic", "avx2")

_log = logging.getLogger(__name__)
_PKG = Path(__file__).resolve().parent
_SRC = _PKG / "csrc"
_OUT = _PKG / "_kernels"
_SOURCES = ("kernels.h", "kernels_generic.cc", "kernels_avx2.cc", "kernels_idot_avx2.cc", "ffi.cc", "attn.h",
            "attn_generic.cc", "attn_avx2.cc", "ffi_attn.cc", "ffi_topk.cc")
_TARGETS = {
    "f32": "JserveMatmulF32",
    "q8_0": "JserveMatmulQ8_0",
    "q4_0": "JserveMatmulQ4_0",
    "q4_1": "JserveMatmulQ4_1",
    "q4_k": "JserveMatmulQ4_K",
    "q5_k": "JserveMatmulQ5_K",
    "q6_k": "JserveMatmulQ6_K",
}
_ATTN_TARGETS = {"float32": "JserveAttnF32", "uint16": "JserveAttnBF16"}  # pool dtype -> target
_ISA_CODE = {"auto": 0, "generic": 1, "avx2": 2}
_CXXFLAGS = ("-O3", "-DNDEBUG", "-std=c++17", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-Wno-attributes",
             "-Wno-return-type")


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def library_path() -> Path:
    """Where the shared library for this jaxlib and machine type lives (git-ignored)."""
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        jaxlib_version = "none"
    return _OUT / f"libjserve_cpu_kernels-jaxlib{jaxlib_version}-{platform.machine().lower()}.so"


def _stale(lib: Path) -> bool:
    if not lib.exists():
        return True
    built = lib.stat().st_mtime
    return any((_SRC / s).stat().st_mtime > built for s in _SOURCES)


def build(force: bool = False) -> Path:
    """Compiles the kernels into `library_path()` unless it is newer than every source.

    Raises RuntimeError (with the reason) when there is no compiler or no jaxlib FFI headers.
    """
    lib = library_path()
    if not force and not _stale(lib):
        return lib
    wanted = os.environ.get("CXX")
    cxx = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError(f"no C++ compiler found ({'$CXX=' + wanted if wanted else 'g++ or c++'})")
    try:
        from jax import ffi as jax_ffi

        include = Path(jax_ffi.include_dir())
    except ImportError as e:
        raise RuntimeError(f"jax.ffi unavailable: {e}") from e
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise RuntimeError(f"jaxlib ships no FFI headers under {include}")
    units = [("kernels_generic.cc", ()), ("attn_generic.cc", ())]
    defines: tuple[str, ...] = ()
    if _is_x86_64():
        units.append(("kernels_avx2.cc", ("-mavx2", "-mfma", "-mf16c")))
        units.append(("kernels_idot_avx2.cc", ("-mavx2", "-mfma", "-mf16c")))
        units.append(("attn_avx2.cc", ("-mavx2", "-mfma", "-mf16c")))
        defines = ("-DJSERVE_HAVE_AVX2",)
    units.append(("ffi.cc", defines))
    units.append(("ffi_attn.cc", defines))
    units.append(("ffi_topk.cc", ()))
    _OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=_OUT) as tmp:
        procs, objs = [], []
        for src, flags in units:
            obj = Path(tmp) / (Path(src).stem + ".o")
            cmd = [cxx, *_CXXFLAGS, *flags, f"-I{include}", "-c", str(_SRC / src), "-o", str(obj)]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
            objs.append(str(obj))
        for cmd, proc in procs:
            out = proc.communicate()[0].decode(errors="replace")
            if proc.returncode:
                raise RuntimeError(f"compiling failed: {' '.join(cmd)}\n{out[-4000:]}")
        tmp_lib = Path(tmp) / lib.name
        link = [cxx, "-shared", "-o", str(tmp_lib), *objs, "-lpthread"]
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"linking failed: {' '.join(link)}\n{done.stderr[-4000:]}")
        os.replace(tmp_lib, lib)  # atomic: a concurrent build or load sees the old or the new file
    _log.info("built %s in %.1f s", lib.name, time.perf_counter() - start)
    return lib


@dataclass(frozen=True)
class _State:
    ok: bool  # the kernels will run by default
    reason: str  # what runs, or why nothing does
    loaded: bool = False  # the library is loaded and registered (the generic path can run)
    has_avx2: bool = False


def _threads() -> int:
    env = os.environ.get("JSERVE_CPU_KERNEL_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _env_isa() -> str:
    isa = os.environ.get("JSERVE_CPU_KERNEL_ISA", "auto").strip().lower() or "auto"
    if isa not in ISAS:
        raise ValueError(f"JSERVE_CPU_KERNEL_ISA={isa!r}: expected one of {ISAS}")
    return isa


@functools.cache
def _state() -> _State:
    """Builds if needed, loads and registers the FFI targets once per process."""
    if sys.platform != "linux":
        return _State(False, f"unsupported platform {sys.platform} (Linux only)")
    try:
        isa = _env_isa()
        lib_path = library_path()
        if _stale(lib_path):
            _log.warning("building the CPU kernels (%s missing or older than its sources); "
                         "`python -m jserve.cpu_kernels build` does it at set-up", lib_path.name)
            build()
        import ctypes

        import jax

        lib = ctypes.CDLL(str(lib_path))
        for name in (*_TARGETS.values(), *_ATTN_TARGETS.values(), "JserveLazyZeros", "JserveTopK"):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        has_avx2 = bool(lib.jserve_cpu_has_avx2())
    except (RuntimeError, OSError, AttributeError, ImportError, ValueError) as e:
        return _State(False, f"kernels unavailable: {str(e).splitlines()[0]}")
    if isa == "generic":
        return _State(True, f"generic (JSERVE_CPU_KERNEL_ISA=generic), {_threads()} threads", True, has_avx2)
    if not has_avx2:
        return _State(False, "this CPU lacks AVX2+FMA+F16C (JSERVE_CPU_KERNEL_ISA=generic forces the slow "
                      "portable path)", True, has_avx2)
    return _State(True, f"avx2+fma+f16c, {_threads()} threads", True, has_avx2)


@functools.cache
def _report() -> _State:
    state = _state()
    if not state.ok:
        _log.warning("row-invariant CPU kernels off (%s): the XLA path stays", state.reason)
    return state


def available() -> bool:
    """True when the kernels are built, loaded and registered and this CPU can run them."""
    return _report().ok


def describe() -> str:
    """What runs ("avx2+fma+f16c, 2 threads") or why nothing does (logged once)."""
    return _report().reason


PRE_NONE, PRE_RMS_NORM = 0, 1  # what the call does to x first (csrc/ffi.cc)


def matmul(x: jax.Array, fmt: str, qs: jax.Array, d: jax.Array | None = None,
           m: jax.Array | None = None, **fused) -> jax.Array:
    """y [..., N] = x [..., K] @ W^T, W [N, K] in `fmt` (see the module docstring); float32.

    Works eagerly and under `jax.jit` (CPU only). The path follows `JSERVE_CPU_KERNEL_ISA`
    (auto | generic | avx2), read when the call is traced. ``fused`` (see `matmul_isa`) folds a
    layer's elementwise neighbours into the call.
    """
    return matmul_isa(x, fmt, qs, d, m, isa=_env_isa(), **fused)


def matmul_isa(x: jax.Array, fmt: str, qs: jax.Array, d: jax.Array | None = None,
               m: jax.Array | None = None, *, isa: str = "auto", norm: jax.Array | None = None,
               eps: float = 0.0, residual: jax.Array | None = None, layer: jax.Array | None = None) -> jax.Array:
    """`matmul` on an explicit path: isa is "auto", "generic" or "avx2" (an error where absent).

    Fused into the call, row by row (so rows stay invariant): ``norm [K]`` first replaces each row of
    x by ``norm * (x * (1 / sqrt(mean(x^2) + eps)))`` (RMSNorm, its sum of squares in a fixed order);
    ``residual [..., N]`` is added to the product (``residual + y``, the bits of adding it apart).

    ``layer`` (a traced int32 scalar): the weights (and ``norm``, if ``[L, K]``) are stacked over
    layers, a leading axis ``L``, and layer ``layer`` is read in place: a loop over layers passes the
    whole stack, so no layer's weights are copied (an index outside the stack is an error)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    state = _report()
    if not state.loaded:
        raise RuntimeError(f"jserve CPU kernels: {state.reason}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt {fmt!r}: expected one of {FORMATS}")
    if isa not in ISAS:
        raise ValueError(f"isa {isa!r}: expected one of {ISAS}")
    if isa == "avx2" and not state.has_avx2:
        raise RuntimeError("isa='avx2' asked for on a CPU without AVX2+FMA+F16C")
    if isa == "auto" and not state.has_avx2:
        isa = "generic"
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    *lead, K = x.shape
    stack = () if layer is None else qs.shape[:1]
    N = qs.shape[len(stack)]
    _check(fmt, K, *(a if a is None or layer is None else jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
                     for a in (qs, d, m)))
    for a in (qs, d, m):
        if a is not None and layer is not None and a.shape[:1] != stack:
            raise ValueError(f"stacked weights must share their leading axis {stack}, got {tuple(a.shape)}")
    if norm is not None and tuple(norm.shape) not in ((K,), (*stack, K)):
        raise ValueError(f"norm must be [{K}]{'' if layer is None else f' or [{stack[0]}, {K}]'}, "
                         f"got {tuple(norm.shape)}")
    if residual is not None and tuple(residual.shape) != (*lead, N):
        raise ValueError(f"residual must be {(*lead, N)}, got {tuple(residual.shape)}")
    rows = math.prod(lead)
    if rows == 0 or N == 0:
        return jnp.zeros((*lead, N), jnp.float32)
    empty = jnp.zeros((0,), jnp.float32)
    g = empty if norm is None else jnp.asarray(norm, jnp.float32)
    res = empty if residual is None else jnp.asarray(residual, jnp.float32).reshape(rows, N)
    where = jnp.zeros((0,), jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32)
    args = [x.reshape(rows, K), g, res, qs] + ([] if fmt == "f32" else [d]) + ([m] if fmt in WITH_M else [])
    args.append(where)
    call = jax.ffi.ffi_call(_TARGETS[fmt], jax.ShapeDtypeStruct((rows, N), jnp.float32))
    pre = PRE_NONE if norm is None else PRE_RMS_NORM
    return call(*args, isa=np.int32(_ISA_CODE[isa]), pre=np.int32(pre),
                eps=np.float32(eps)).reshape(*lead, N)


def _check(fmt: str, K: int, qs: jax.Array, d: jax.Array | None, m: jax.Array | None) -> None:
    """Shapes and dtypes, refused here with a precise message rather than inside XLA."""
    import numpy as np

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"matmul({fmt}): {what}")

    if fmt == "f32":
        need(qs.dtype == np.float32 and qs.ndim == 2 and qs.shape[1] == K, f"qs must be float32 [N, {K}]")
        return
    per = 256 if fmt in KQUANTS else 32
    nb, qdtype = K // per, np.int8 if fmt == "q8_0" else np.uint8
    width = KQ_WIDTH.get(fmt, 32 if fmt == "q8_0" else 16)
    need(K % per == 0, f"K = {K} is not a multiple of {per}")
    need(qs.dtype == qdtype and qs.shape[1:] == (nb, width),
         f"qs must be {np.dtype(qdtype).name} [N, {nb}, {width}], got {qs.dtype} {qs.shape}")
    need(d is not None and d.dtype == np.float16 and d.shape == qs.shape[:2],
         f"d must be float16 {qs.shape[:2]}")
    if fmt in WITH_M:
        need(m is not None and m.dtype == np.float16 and m.shape == qs.shape[:2],
             f"m must be float16 {qs.shape[:2]}")


def paged_attention(q: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array, table: jax.Array,
                    slots: jax.Array, *, scale: float, softcap: float | None = None, window: int | None = None,
                    isa: str | None = None, layer: jax.Array | None = None) -> jax.Array:
    """Row-invariant attention over a page pool (``csrc/attn.h`` has the recipe): ``q [R, C, K, G, H]``
    (row r: C query positions ``positions [R, C]`` of slot ``slots [R]``), pools ``k/v [P, K, B, H]``
    float32 or bfloat16 bits (uint16), ``table [S, M]`` int32 → float32 ``[R, C, K, G, H]``.

    A query at ``pos`` sees its slot's keys ``kpos <= pos`` (and ``kpos > pos - window``), reading
    only the pages that hold them; a query at a position < 0 or >= M·B gives zeros. Its bits depend
    on nothing else (not R, C, the other rows or the call). ``isa`` as in ``matmul_isa`` (default:
    ``JSERVE_CPU_KERNEL_ISA``); the AVX2 path needs a head dim that is a multiple of 8 ("auto" takes
    the generic path otherwise). ``layer`` (a traced int32 scalar): the pools are stacked over layers,
    ``[L, P, K, B, H]``, and layer ``layer`` is read in place."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    state = _report()
    if not state.loaded:
        raise RuntimeError(f"jserve CPU kernels: {state.reason}")
    isa = _env_isa() if isa is None else isa
    if isa not in ISAS:
        raise ValueError(f"isa {isa!r}: expected one of {ISAS}")
    if isa == "avx2" and not state.has_avx2:
        raise RuntimeError("isa='avx2' asked for on a CPU without AVX2+FMA+F16C")
    if q.ndim != 5:
        raise ValueError(f"paged_attention: q must be [R, C, K, G, H], got {tuple(q.shape)}")
    r, c, kh, _, h = q.shape
    if k.dtype.name not in _ATTN_TARGETS or v.dtype != k.dtype:
        raise ValueError(f"paged_attention: pools must both be float32 or uint16 (bfloat16 bits), "
                         f"got {k.dtype}, {v.dtype}")
    o = 0 if layer is None else 1
    if k.ndim != 4 + o or tuple(v.shape) != tuple(k.shape) or (k.shape[1 + o], k.shape[3 + o]) != (kh, h):
        raise ValueError(f"paged_attention: pools must be [{'' if layer is None else 'L, '}P, {kh}, B, {h}], "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if table.ndim != 2 or tuple(positions.shape) != (r, c) or tuple(slots.shape) != (r,):
        raise ValueError(f"paged_attention: need table [S, M], positions [{r}, {c}], slots [{r}]; got "
                         f"{tuple(table.shape)}, {tuple(positions.shape)}, {tuple(slots.shape)}")
    if isa == "avx2" and h % 8:
        raise ValueError(f"paged_attention: the avx2 path needs a head dim that is a multiple of 8, got {h}")
    if window is not None and window < 1:
        raise ValueError(f"paged_attention: window {window} must be positive")
    call = jax.ffi.ffi_call(_ATTN_TARGETS[k.dtype.name], jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(jnp.asarray(q, jnp.float32), jnp.asarray(positions, jnp.int32), k, v, jnp.asarray(table, jnp.int32),
                jnp.asarray(slots, jnp.int32),
                jnp.zeros((0,), jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32),
                isa=np.int32(_ISA_CODE[isa]), scale=np.float32(scale),
                cap=np.float32(softcap or 0.0), window=np.int32(window or 0))


def lazy_zeros(shape: tuple[int, ...], dtype) -> jax.Array:
    """Zeros of ``shape`` whose memory is written only where it is not already zero (the kernel in
    ``csrc/ffi.cc``): a large buffer fresh from the allocator stays unresident until written, so a
    KV pool made this way costs resident memory page by page as sequences fill it. Under ``jit``
    (an initial decode state); the result is all zeros whatever memory it got."""
    import jax

    if not _report().loaded:
        raise RuntimeError(f"jserve CPU kernels: {_report().reason}")
    return jax.ffi.ffi_call("JserveLazyZeros", jax.ShapeDtypeStruct(tuple(shape), dtype))()


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` for a float32 ``x [B, V]``, the same values and indices (IEEE total
    order, ties by the lower index), from the kernel in ``csrc/ffi_topk.cc``: one pass over block
    maxima bounds the answer, a second keeps the few entries past the bound, those are sorted
    (XLA:CPU sorts every row whole). Under ``jit`` or eagerly, CPU only."""
    import jax
    import numpy as np

    if not _report().loaded:
        raise RuntimeError(f"jserve CPU kernels: {_report().reason}")
    b, v = x.shape
    if not 1 <= k <= v:
        raise ValueError(f"top_k needs 1 <= k <= {v}, got {k}")
    out = (jax.ShapeDtypeStruct((b, k), np.float32), jax.ShapeDtypeStruct((b, k), np.int32))
    return tuple(jax.ffi.ffi_call("JserveTopK", out)(x.astype(np.float32), k=np.int64(k)))


def attention_calls() -> int:
    """How many times the attention kernel has run in this process (tests count them)."""
    import ctypes

    if not _report().loaded:
        return 0
    return int(ctypes.CDLL(str(library_path())).jserve_attn_calls())


def split_gguf_blocks(raw: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """A GGUF tensor's raw bytes uint8 [N, K/32 * block bytes] -> `matmul`'s (qs, d) or (qs, d, m).

    Block layouts (ggml): q8_0 = d f16, 32 int8; q4_0 = d f16, 16 bytes; q4_1 = d f16, m f16, 16 bytes;
    q4_k / q5_k = d f16, dmin f16, then the qs bytes; q6_k = the qs bytes, then d f16 (K-quants: per
    256 values, raw [N, K/256 * block bytes]).
    """
    import numpy as np

    size = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q4_k": 144, "q5_k": 176, "q6_k": 210}[fmt]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1, size)
    if fmt == "q6_k":
        return np.ascontiguousarray(blocks[..., :208]), np.ascontiguousarray(blocks[..., 208:]).view(np.float16)[..., 0]
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if fmt == "q8_0":
        return np.ascontiguousarray(blocks[..., 2:]).view(np.int8), d
    if fmt == "q4_0":
        return np.ascontiguousarray(blocks[..., 2:]), d
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    return np.ascontiguousarray(blocks[..., 4:]), d, m  # q4_1, q4_k, q5_k


def main(argv: list[str]) -> int:
    """`python -m jserve.cpu_kernels build [--force]`: compile now; prints what runs."""
    if not argv or argv[0] != "build":
        print("usage: python -m jserve.cpu_kernels build [--force]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        lib = build(force="--force" in argv[1:])
    except RuntimeError as e:
        print(f"[cpu_kernels] not built ({str(e).splitlines()[0]}): the XLA path stays", file=sys.stderr)
        return 0
    print(f"[cpu_kernels] {lib.relative_to(_PKG.parent)}: {describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
