"""Row-invariant CPU kernels (jserve.cpu_kernels) against gguf's own dequantize + a float64 numpy matmul.

Row invariance is checked bitwise: a row computed amid M - 1 random rows equals the same row alone.
Both paths run here: AVX2 (where the CPU has it) and the portable generic path (chosen per call, and
through JSERVE_CPU_KERNEL_ISA in a subprocess).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jserve import cpu_kernels as ck

needs_kernels = pytest.mark.skipif(not ck.available(), reason=f"CPU kernels unavailable: {ck.describe()}")

gguf = pytest.importorskip("gguf")
jax = pytest.importorskip("jax")
jnp = jax.numpy

QTYPE = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
         "q4_1": gguf.GGMLQuantizationType.Q4_1}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
ROWS = (1, 2, 3, 7, 16, 33, 64, 257, 512)
BASIC = tuple(f for f in ck.FORMATS if f not in ck.KQUANTS)  # gguf quantizes these (K-quants: below)
INT_DOT = ("q8_0", "q4_0", "q4_1")  # the integer-dot recipe (x quantized per block to int16)


def _isas() -> list[str]:
    return ["generic", "avx2"] if ck.available() and ck._state().has_avx2 else ["generic"]


def quantized(fmt: str, n: int, k: int, seed: int = 0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """W [N, K] quantized by gguf itself -> (matmul operands, gguf's dequantized W as float64)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    if fmt == "f32":
        return (w,), w.astype(np.float64)
    raw = gguf.quants.quantize(w, QTYPE[fmt])
    return ck.split_gguf_blocks(raw, fmt), gguf.quants.dequantize(raw, QTYPE[fmt]).astype(np.float64)


def random_blocks(fmt: str, n: int, k: int, seed: int = 0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Random raw blocks (every nibble / int8 value, random half scales and offsets), dequantized by gguf."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    raw = rng.integers(0, 256, (n, nb, BLOCK_BYTES[fmt]), dtype=np.uint8)
    halves = 2 if fmt == "q4_1" else 1
    scales = (rng.standard_normal((n, nb, halves)) * 0.02).astype(np.float16)
    raw[..., : 2 * halves] = scales.view(np.uint8).reshape(n, nb, 2 * halves)
    raw = raw.reshape(n, nb * BLOCK_BYTES[fmt])
    return ck.split_gguf_blocks(raw, fmt), gguf.quants.dequantize(raw, QTYPE[fmt]).astype(np.float64)


def reference(x: np.ndarray, w64: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w64.T


def int16_bound(x: np.ndarray, fmt: str, ops: tuple[np.ndarray, ...]) -> np.ndarray | float:
    """How far the integer-dot recipe (Q8_0, Q4_0, Q4_1; csrc/kernels.h) may stray from exact arithmetic.

    x is quantized per 32-value block to int16, s_b = max|x_b| / 32767, so |x_j - s_b xq_j| <= s_b / 2
    (0.51 here: x / s_b is itself rounded to float32), and |dy[r, n]| <= sum_b 0.51 s_b sum_j |q_j d_b|
    over the integer quants q that meet xq (Q4_0/Q4_1: the unsigned nibbles; their offsets use x itself).
    0 for the other formats (float recipe)."""
    if fmt not in INT_DOT:
        return 0.0
    x = np.asarray(x, np.float64)
    k = x.shape[-1]
    x = x.reshape(-1, k // 32, 32)
    s = np.abs(x).max(-1) / 32767  # [M, nb]
    qs, d = ops[0], np.abs(ops[1].astype(np.float64))
    if fmt == "q8_0":
        q = np.abs(qs.astype(np.float64)).sum(-1)  # [N, nb]
    else:
        q = (qs & 15).astype(np.float64).sum(-1) + (qs >> 4).astype(np.float64).sum(-1)
    return 0.51 * s @ (q * d).T


def assert_close(y: np.ndarray, ref: np.ndarray, slack: np.ndarray | float = 0.0) -> None:
    """|y - ref| <= 1e-5 max|ref| (float32 rounding) + slack (the int16 recipe's bound, elementwise)."""
    scale = np.abs(ref).max()
    err = np.abs(y - ref)
    slack = np.broadcast_to(slack, err.shape)
    worst = np.unravel_index(np.argmax(err - slack), err.shape)
    assert np.all(err <= 1e-5 * scale + slack), (
        f"error {err[worst]:.3e} at {worst} > 1e-5 of scale {scale:.3e} + slack {slack[worst]:.3e}")


def run(x: np.ndarray, fmt: str, ops: tuple[np.ndarray, ...], isa: str = "auto") -> np.ndarray:
    return np.asarray(ck.matmul_isa(jnp.asarray(x), fmt, *(jnp.asarray(a) for a in ops), isa=isa))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", BASIC)
def test_matches_gguf_dequantize_and_numpy(fmt, isa):
    k = 100 if fmt == "f32" else 96  # f32: K not a multiple of 8
    ops, w64 = quantized(fmt, 37, k)
    x = np.random.default_rng(1).standard_normal((40, k)).astype(np.float32)
    for m in (1, 2, 3, 4, 40):  # both drivers: registers (M <= 4) and unpacked panels
        assert_close(run(x[:m], fmt, ops, isa), reference(x[:m], w64), int16_bound(x[:m], fmt, ops))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_random_blocks_every_value_matches_gguf(fmt, isa):
    ops, w64 = random_blocks(fmt, 29, 64, seed=3)
    x = np.random.default_rng(4).standard_normal((9, 64)).astype(np.float32)
    assert_close(run(x, fmt, ops, isa), reference(x, w64), int16_bound(x, fmt, ops))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", BASIC)
def test_row_alone_equals_row_amid_any_number_of_rows_bitwise(fmt, isa):
    k = 72 if fmt == "f32" else 64
    ops, w64 = quantized(fmt, 70, k, seed=5)  # N = 70: not a multiple of any tile or thread chunk
    rng = np.random.default_rng(6)
    needle = rng.standard_normal((1, k)).astype(np.float32)
    alone = run(needle, fmt, ops, isa)[0]
    assert_close(alone[None], reference(needle, w64), int16_bound(needle, fmt, ops))
    for m in ROWS:
        x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10)
        at = int(rng.integers(m))
        x[at] = needle[0]
        y = run(x, fmt, ops, isa)
        assert np.array_equal(y[at], alone), f"M={m}: row {at} differs from the row alone"
        assert_close(y, reference(x, w64), int16_bound(x, fmt, ops))


def int16_recipe(x: np.ndarray, fmt: str, ops: tuple[np.ndarray, ...]) -> np.ndarray:
    """kernels.h's integer-dot recipe in numpy: x quantized per block as stated there, the integer dots
    in int64, the rest in float64 (so only the kernel's float32 rounding separates the two)."""
    m, k = x.shape
    xb = x.astype(np.float32).reshape(m, k // 32, 32)
    s = np.abs(xb).max(-1, keepdims=True) / np.float32(32767)
    with np.errstate(invalid="ignore", divide="ignore"):
        xq = np.where(s > 0, np.rint(np.clip(xb / s, -32767, 32767)), 0).astype(np.int64)
    qs, d = ops[0], ops[1].astype(np.float64)
    q = qs.astype(np.int64) if fmt == "q8_0" else np.concatenate([qs & 15, qs >> 4], -1).astype(np.int64)
    isum = np.einsum("mbj,nbj->mnb", xq, q)
    y = (isum * (d[None] * s[..., 0].astype(np.float64)[:, None])).sum(-1)
    if fmt != "q8_0":
        mv = ops[2].astype(np.float64) if fmt == "q4_1" else -8 * d
        y += xb.astype(np.float64).sum(-1) @ mv.T
    return y


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", INT_DOT)
def test_int16_recipe_as_stated_and_rows_invariant_1_to_33(fmt, isa):
    """Every M from 1 to 33 (both drivers, every tile remainder), K = 96 (a partial group of 8 blocks):
    the row alone's bits amid any rows, and each output within float32 rounding of the recipe computed
    in numpy (much tighter than int16_bound: the quantization of x is the recipe's, not an error)."""
    ops, _ = quantized(fmt, 13, 96, seed=21)
    rng = np.random.default_rng(22)
    needle = rng.standard_normal((1, 96)).astype(np.float32)
    alone = run(needle, fmt, ops, isa)[0]
    for m in range(1, 34):
        x = rng.standard_normal((m, 96)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
        at = int(rng.integers(m))
        x[at] = needle[0]
        y = run(x, fmt, ops, isa)
        assert np.array_equal(y[at], alone), f"M={m}: row {at} differs from the row alone"
        want = int16_recipe(x, fmt, ops)
        scale = np.abs(want).max(-1, keepdims=True)
        assert np.all(np.abs(y - want) <= 2e-6 * scale), f"M={m}: {np.abs(y - want).max()}"


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", INT_DOT)
def test_int16_recipe_zero_and_non_finite_rows(fmt, isa):
    """A zero row gives zeros; a NaN or an inf in a row reaches every output of that row (its block
    scale is NaN or inf), and only that row."""
    ops, _ = quantized(fmt, 9, 64, seed=23)
    x = np.random.default_rng(24).standard_normal((5, 64)).astype(np.float32)
    x[1] = 0.0
    x[2, 40] = np.nan
    x[3, 3] = np.inf
    y = run(x, fmt, ops, isa)
    assert np.array_equal(y[1], np.zeros(9, np.float32))
    assert np.all(np.isnan(y[2])) and np.all(~np.isfinite(y[3]))
    assert np.all(np.isfinite(y[[0, 4]]))
    assert np.array_equal(y[4], run(x[4:5], fmt, ops, isa)[0])


@needs_kernels
@pytest.mark.parametrize("fmt", BASIC)
def test_rows_invariant_under_jit(fmt):
    k = 64
    ops, _ = quantized(fmt, 45, k, seed=7)
    ops_j = tuple(jnp.asarray(a) for a in ops)
    f = jax.jit(lambda x, *o: ck.matmul(x, fmt, *o))
    rng = np.random.default_rng(8)
    needle = rng.standard_normal((k,)).astype(np.float32)
    alone = np.asarray(f(jnp.asarray(needle[None]), *ops_j))[0]
    assert np.array_equal(alone, run(needle[None], fmt, ops)[0])  # jitted == eager
    for m in (2, 7, 64, 257):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[m // 2] = needle
        assert np.array_equal(np.asarray(f(jnp.asarray(x), *ops_j))[m // 2], alone)


@needs_kernels
def test_leading_dims_and_k_32():
    ops, w64 = quantized("q4_1", 5, 32, seed=9)
    x = np.random.default_rng(10).standard_normal((2, 3, 32)).astype(np.float32)
    y = np.asarray(ck.matmul(jnp.asarray(x), "q4_1", *(jnp.asarray(a) for a in ops)))
    assert y.shape == (2, 3, 5)
    assert_close(y, reference(x.reshape(6, 32), w64).reshape(2, 3, 5),
                 int16_bound(x.reshape(6, 32), "q4_1", ops).reshape(2, 3, 5))
    assert ck.matmul(jnp.zeros((0, 32)), "q4_1", *(jnp.asarray(a) for a in ops)).shape == (0, 5)


@needs_kernels
def test_tied_embedding_shape_49152_by_576():
    ops, w64 = random_blocks("q8_0", 49152, 576, seed=11)
    x = np.random.default_rng(12).standard_normal((16, 576)).astype(np.float32)
    for m in (1, 3, 16):
        y = run(x[:m], "q8_0", ops)
        assert_close(y, reference(x[:m], w64), int16_bound(x[:m], "q8_0", ops))
        assert np.array_equal(y[m - 1], run(x[m - 1 : m], "q8_0", ops)[0])


@needs_kernels
def test_bad_operands_refused_with_a_message():
    ops, _ = quantized("q4_1", 4, 64)
    x = jnp.zeros((2, 64))
    with pytest.raises(ValueError, match="m must be"):
        ck.matmul(x, "q4_1", jnp.asarray(ops[0]), jnp.asarray(ops[1]))
    with pytest.raises(ValueError, match="multiple of 32"):
        ck.matmul(jnp.zeros((2, 48)), "q4_0", jnp.zeros((4, 1, 16), jnp.uint8), jnp.zeros((4, 1), jnp.float16))
    with pytest.raises(ValueError, match="fmt"):
        ck.matmul(x, "q3_k", jnp.asarray(ops[0]))


@needs_kernels
def test_env_vars_select_generic_path_and_one_thread_same_bits(tmp_path: pathlib.Path):
    """A fresh process on JSERVE_CPU_KERNEL_ISA=generic with one thread gives this process's bits,
    where the same call is split across threads (64 x 300 x 256: several column chunks)."""
    ops, w64 = quantized("q4_0", 300, 256, seed=13)
    x = np.random.default_rng(14).standard_normal((64, 256)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, qs=ops[0], d=ops[1])
    code = (
        "import numpy as np, jax.numpy as jnp; from jserve import cpu_kernels as ck; "
        f"a = np.load({str(tmp_path / 'in.npz')!r}); print(ck.describe()); "
        "y = ck.matmul(jnp.asarray(a['x']), 'q4_0', jnp.asarray(a['qs']), jnp.asarray(a['d'])); "
        f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(y))"
    )
    env = dict(os.environ, JSERVE_CPU_KERNEL_ISA="generic", JSERVE_CPU_KERNEL_THREADS="1", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("generic") and "1 threads" in done.stdout
    y = np.load(tmp_path / "y.npy")
    assert np.array_equal(y, run(x, "q4_0", ops, isa="generic"))
    assert_close(y, reference(x, w64), int16_bound(x, "q4_0", ops))


def test_import_is_light_and_builds_nothing():
    code = "import sys, jserve.cpu_kernels; print('jax' in sys.modules, 'numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_no_compiler_means_unavailable_with_the_reason_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ck, "library_path", lambda: tmp_path / "missing.so")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setattr(ck.shutil, "which", lambda name: None)
    state = ck._state.__wrapped__()  # uncached: the process's real state stays as it is
    assert not state.ok and not state.loaded
    assert "compiler" in state.reason
    with pytest.raises(RuntimeError, match="compiler"):
        ck.build()
    assert not (tmp_path / "missing.so").exists()


# K-quants: gguf (this version) has no K-quant quantizer, so the weights are random valid super-blocks
# (every byte random: all quants, 6-bit scales/minimums and int8 scales occur), dequantized by gguf.
KQ = {"q4_k": (gguf.GGMLQuantizationType.Q4_K, 144), "q5_k": (gguf.GGMLQuantizationType.Q5_K, 176),
      "q6_k": (gguf.GGMLQuantizationType.Q6_K, 210)}


def random_kquant_raw(fmt: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes uint8 [n, k/256 * block bytes] with small random float16 d (and dmin)."""
    rng = np.random.default_rng(seed)
    size = KQ[fmt][1]
    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    if fmt == "q6_k":
        raw[..., 208:] = (rng.standard_normal((n, k // 256, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    else:
        raw[..., :4] = (rng.standard_normal((n, k // 256, 2)) * 2e-3).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def random_kquant(fmt: str, n: int, k: int, seed: int = 0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    raw = random_kquant_raw(fmt, n, k, seed)
    return ck.split_gguf_blocks(raw, fmt), gguf.quants.dequantize(raw, KQ[fmt][0]).astype(np.float64)


def test_kquant_split_is_exact_and_documented_widths():
    for fmt, (qtype, size) in KQ.items():
        assert gguf.GGML_QUANT_SIZES[qtype] == (256, size)  # the block bytes are gguf's own
        raw = random_kquant_raw(fmt, 3, 512, seed=1)
        parts = ck.split_gguf_blocks(raw, fmt)
        assert parts[0].shape == (3, 2, ck.KQ_WIDTH[fmt]) and parts[1].shape == (3, 2)
        assert sum(part[0, 0].nbytes for part in parts) == size  # one block's parts: its bytes, each once
        assert len(parts) == (3 if fmt in ck.WITH_M else 2)
        # the parts hold every byte of the block once: reassembled in ggml's order they are the file's bytes
        halves = [p[..., None].view(np.uint8) for p in parts[1:]]
        order = [parts[0], *halves] if fmt == "q6_k" else [*halves, parts[0]]
        np.testing.assert_array_equal(np.concatenate(order, axis=-1).reshape(3, -1), raw)


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", list(KQ))
def test_kquant_matches_gguf_dequantize_and_numpy(fmt, isa):
    ops, w64 = random_kquant(fmt, 37, 512, seed=11)
    x = np.random.default_rng(12).standard_normal((40, 512)).astype(np.float32)
    for m in (1, 2, 3, 4, 40):  # both drivers
        assert_close(run(x[:m], fmt, ops, isa), reference(x[:m], w64))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", list(KQ))
def test_kquant_row_alone_equals_row_amid_any_number_of_rows_bitwise(fmt, isa):
    ops, w64 = random_kquant(fmt, 70, 256, seed=13)  # N = 70: no multiple of a tile or chunk
    rng = np.random.default_rng(14)
    needle = rng.standard_normal((1, 256)).astype(np.float32)
    alone = run(needle, fmt, ops, isa)[0]
    assert_close(alone, reference(needle, w64)[0])
    for m in (1, 2, 3, 7, 16, 33):
        x = rng.standard_normal((m, 256)).astype(np.float32) * rng.uniform(0.1, 10)
        at = int(rng.integers(m))
        x[at] = needle[0]
        y = run(x, fmt, ops, isa)
        assert np.array_equal(y[at], alone), f"M={m}: row {at} differs from the row alone"
        assert_close(y, reference(x, w64))


@needs_kernels
def test_kquant_k_not_a_multiple_of_256_refused():
    ops, _ = random_kquant("q4_k", 4, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        run(np.zeros((1, 288), np.float32), "q4_k", ops)


@needs_kernels
@pytest.mark.parametrize("fmt", list(KQ))
def test_kquant_rows_invariant_under_jit(fmt):
    ops, _ = random_kquant(fmt, 45, 256, seed=15)
    ops_j = tuple(jnp.asarray(a) for a in ops)
    f = jax.jit(lambda x, *o: ck.matmul(x, fmt, *o))
    rng = np.random.default_rng(16)
    needle = rng.standard_normal((256,)).astype(np.float32)
    alone = np.asarray(f(jnp.asarray(needle[None]), *ops_j))[0]
    assert np.array_equal(alone, run(needle[None], fmt, ops)[0])  # jitted == eager
    for m in (2, 7, 33):
        x = rng.standard_normal((m, 256)).astype(np.float32)
        x[m // 2] = needle
        assert np.array_equal(np.asarray(f(jnp.asarray(x), *ops_j))[m // 2], alone)



def _fused_reference(x: np.ndarray, w64: np.ndarray, g: np.ndarray | None, res: np.ndarray | None,
                     eps: float = 1e-5) -> np.ndarray:
    """The fused call's meaning in float64 numpy: RMSNorm (when ``g``), the product, the residual."""
    x = x.astype(np.float64)
    if g is not None:
        x = g * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    y = x @ w64.T
    return y if res is None else y + res


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["f32", "q4_1", "q8_0"])
@pytest.mark.parametrize("norm", [True, False])
def test_fused_norm_and_residual_match_numpy_and_stay_row_invariant(fmt, norm, isa):
    k, n = 64, 70
    ops, w64 = quantized(fmt, n, k, seed=11)
    rng = np.random.default_rng(12)
    g = rng.standard_normal(k).astype(np.float32)
    fused = {"norm": jnp.asarray(g), "eps": 1e-5} if norm else {}
    needle, needle_res = rng.standard_normal((1, k)).astype(np.float32), rng.standard_normal((1, n)).astype(np.float32)

    def call(x, res=None):
        return np.asarray(ck.matmul_isa(jnp.asarray(x), fmt, *(jnp.asarray(a) for a in ops), isa=isa,
                                        residual=None if res is None else jnp.asarray(res), **fused))

    alone = call(needle, needle_res)[0]
    for m in (1, 3, 16, 33):
        x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10)
        res = rng.standard_normal((m, n)).astype(np.float32)
        at = int(rng.integers(m))
        x[at], res[at] = needle[0], needle_res[0]
        y = call(x, res)
        assert np.array_equal(y[at], alone), f"M={m}: row {at} differs from the row alone"
        gn = g.astype(np.float64) if norm else None
        xn = _fused_reference(x, np.eye(k), gn, None)  # x as the product sees it
        assert_close(y, _fused_reference(x, w64, gn, res), int16_bound(xn, fmt, ops))
    # The residual inside the call gives the bits of adding it apart.
    assert np.array_equal(alone, needle_res[0] + call(needle)[0])


@needs_kernels
def test_fused_operands_refused_with_a_message():
    ops, _ = quantized("q4_1", 8, 64)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="norm must be"):
        ck.matmul(x, "q4_1", *ops, norm=jnp.ones((32,), jnp.float32))
    with pytest.raises(ValueError, match="residual must be"):
        ck.matmul(x, "q4_1", *ops, residual=jnp.ones((2, 9), jnp.float32))


@needs_kernels
@pytest.mark.parametrize("b, v, k", [(1, 49152, 256), (5, 49152, 20), (3, 100, 7), (2, 64, 64), (2, 130, 1),
                                     (4, 1000, 256), (2, 4099, 64)])
def test_top_k_is_lax_top_k_bitwise(b, v, k):
    """The kernel's values and indices are ``lax.top_k``'s: IEEE total order (+NaN first, +0 before
    -0, -NaN last), ties by the lower index, masked (-inf) rows with fewer finite entries than k."""
    import jax.numpy as jnp

    rng = np.random.default_rng(b * v + k)
    x = rng.standard_normal((b, v)).astype(np.float32) * 4
    ties = np.round(x)  # hundreds of equal values
    masked = np.where(rng.random((b, v)) < 0.995, -np.inf, x).astype(np.float32)
    special = x.copy()
    special[0, :6] = [np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf]
    special[-1, -3:] = [np.nan, np.nan, np.inf]
    flat = np.zeros((b, v), np.float32)  # every entry tied: the lowest indices
    masked[-1] = -np.inf  # a row with nothing allowed
    for case in (x, ties, masked, special, flat):
        want = jax.lax.top_k(jnp.asarray(case), k)
        got = jax.jit(lambda a: ck.top_k(a, k))(jnp.asarray(case))
        for w, g in zip(want, got):
            assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


@needs_kernels
def test_sampling_and_top_logprobs_take_the_top_k_kernel():
    import jax.numpy as jnp

    from jserve.sampling import top_k

    hlo = jax.jit(lambda a: top_k(a, 8)).lower(jnp.zeros((2, 300), jnp.float32)).as_text()
    assert "JserveTopK" in hlo
    hlo = jax.jit(lambda a: top_k(a, 8)).lower(jnp.zeros((2, 300), jnp.bfloat16)).as_text()
    assert "JserveTopK" not in hlo  # other dtypes: XLA's
    with pytest.raises(ValueError, match="1 <= k"):
        ck.top_k(jnp.zeros((1, 4), jnp.float32), 5)
