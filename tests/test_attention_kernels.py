"""Paged decode attention: the XLA path against a float64 oracle, and the Pallas kernels against the
XLA path on each family's attention shape.

On CPU the kernels run in Pallas interpret mode. With ``JSERVE_KERNELS_NATIVE=1`` (set by
``scripts/device_check.sh``) they run natively instead, and a kernel for another platform than
JAX's default backend is skipped.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import attention_kernels as ak
from jserve.attention_kernels import NO_PAGE, choose_impl, default_impl, paged_attention

NATIVE = os.environ.get("JSERVE_KERNELS_NATIVE") == "1"
INTERPRET = not NATIVE
# Interpret mode on CPU computes in float32 throughout. On a device, float32 dots run as TF32 (GPU)
# or bfloat16 passes (TPU) unless told otherwise, which the kernels do not: device runs get a looser bound.
TOL = 1e-5 if INTERPRET else 3e-3
ORACLE_TOL = 2e-6 if INTERPRET else TOL  # the XLA path's own dots are TF32 on a GPU too
PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "pallas_tpu_paged": "tpu"}
B = 16  # positions per page: small keeps interpret mode fast; the kernels take any page size
M = 4  # pages per slot
P = 14  # pages in the pool

# (name, query heads N, KV heads K, head dim H, soft cap, sliding window): each family's head
# layout, with fewer heads.
FAMILIES = [
    ("smollm2", 9, 3, 64, None, None),  # GQA 3, head dim 64
    ("llama3", 8, 2, 128, None, None),  # GQA 4
    ("gemma2", 4, 2, 256, 50.0, 24),  # GQA 2, head dim 256, soft cap, sliding window
    ("mqa8", 8, 1, 128, None, None),  # GQA 8
    ("mha", 2, 2, 64, None, 40),  # GQA 1, with a window (Mistral-style)
]
LENGTHS = [1, 17, 64, 0, 33]  # one position, a page and one, every page, an idle slot, mid-page


def bf16_exact(x: np.ndarray) -> np.ndarray:
    """Values a bfloat16 holds exactly: products of two are exact in float32, so a TPU's bfloat16
    passes (and a GPU's TF32) change no score."""
    return np.array(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def make_case(n: int, kh: int, h: int, seed: int = 0, stale: bool = True, b: int = B, m: int = M, p: int = P,
              lengths: list[int] = LENGTHS):
    """A pool whose slots own scattered pages, page-table entries past each slot's end either
    ``NO_PAGE`` or a stale page, and (``stale``) large values in every page nobody reads."""
    rng = np.random.default_rng(seed)
    s = len(lengths)
    q = bf16_exact(rng.standard_normal((s, n, h)))
    k = bf16_exact(rng.standard_normal((kh, p, b, h)))
    v = bf16_exact(rng.standard_normal((kh, p, b, h)))
    order = rng.permutation(p)
    table = np.full((s, m), NO_PAGE, np.int32)
    used = np.zeros(p, bool)
    nxt = 0
    for i, length in enumerate(lengths):
        for j in range(-(-length // b)):
            table[i, j] = order[nxt]
            used[order[nxt]] = True
            nxt += 1
    table[1, m - 1] = table[2, 0]  # a stale entry past slot 1's end: another slot's page
    if stale:
        k[:, ~used] = 1e4
        v[:, ~used] = -1e4
        for i, length in enumerate(lengths):  # positions past the end inside a slot's last page
            if length % b and length:
                page = table[i, length // b]
                if page not in table[[j for j in range(s) if j != i]]:
                    k[:, page, length % b:] = 1e4
                    v[:, page, length % b:] = -1e4
    return q, k, v, table, np.asarray(lengths, np.int32)


def oracle(q, k, v, table, lengths, scale, softcap, window) -> np.ndarray:
    """Float64, one slot and head at a time, reading positions one by one through the page table."""
    s, n, h = q.shape
    kh, _, b, _ = k.shape
    out = np.zeros((s, n, h))
    for i in range(s):
        length = int(lengths[i])
        pos = [t for t in range(length) if window is None or t > length - 1 - window]
        if not pos:
            continue
        for head in range(n):
            kv = head // (n // kh)
            keys = np.stack([k[kv, table[i, t // b], t % b] for t in pos]).astype(np.float64)
            vals = np.stack([v[kv, table[i, t // b], t % b] for t in pos]).astype(np.float64)
            sc = keys @ q[i, head].astype(np.float64) * scale
            if softcap is not None:
                sc = softcap * np.tanh(sc / softcap)
            w = np.exp(sc - sc.max())
            out[i, head] = w @ vals / w.sum()
    return out


def run(impl, q, k, v, table, lengths, scale, softcap, window, interpret=INTERPRET):
    return np.asarray(paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table),
                                      jnp.asarray(lengths), scale=scale, softcap=softcap, window=window,
                                      impl=impl, interpret=interpret))


# ----- the XLA path


@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_xla_path_equals_float64_oracle(family):
    _, n, kh, h, softcap, window = family
    q, k, v, table, lengths = make_case(n, kh, h)
    scale = 1 / np.sqrt(h)
    want = oracle(q, k, v, table, lengths, scale, softcap, window)
    got = run("xla", q, k, v, table, lengths, scale, softcap, window)
    np.testing.assert_allclose(got, want, atol=ORACLE_TOL, rtol=0)
    assert (got[LENGTHS.index(0)] == 0).all()


def test_xla_path_is_bitwise_independent_of_pages_past_the_end():
    q, k, v, table, lengths = make_case(9, 3, 64, stale=False)
    clean = run("xla", q, k, v, table, lengths, 0.125, None, None)
    kn, vn = k.copy(), v.copy()
    for i, length in enumerate(LENGTHS):  # NaN and inf everywhere this slot's view does not reach
        if length % B:
            kn[:, table[i, length // B], length % B:] = np.nan
            vn[:, table[i, length // B], length % B:] = np.inf
    listed = set(table[table >= 0].tolist())
    for page in range(P):
        if page not in listed:
            kn[:, page], vn[:, page] = np.nan, np.nan
    noisy = run("xla", q, kn, vn, np.where(table >= 0, table, 0).astype(np.int32), lengths, 0.125, None, None)
    assert np.array_equal(clean, noisy)


# ----- dispatch


def test_platform_picks_its_kernel_and_windowed_layers_fall_back_where_a_kernel_has_no_window():
    assert default_impl("cpu") == "xla"
    assert default_impl("gpu") == "pallas_gpu"
    assert default_impl("tpu") == "pallas_tpu_paged"  # reads the engine's [K, P, B, H] pool in place
    assert choose_impl(None, "gpu") == "pallas_gpu"
    assert choose_impl(4096, "gpu") == "xla"
    assert choose_impl(4096, "tpu") == "xla"
    assert choose_impl(4096, impl="pallas_tpu") == "pallas_tpu"  # the ragged kernel, by name, has a window
    assert default_impl() == {"gpu": "pallas_gpu", "tpu": "pallas_tpu_paged"}.get(jax.default_backend(), "xla")


def test_unknown_impl_or_unsupported_window_or_bad_shapes_raise_precisely():
    q, k, v, table, lengths = make_case(4, 2, 64)
    with pytest.raises(ValueError, match="unknown attention implementation 'cuda'"):
        run("cuda", q, k, v, table, lengths, 0.125, None, None)
    with pytest.raises(ValueError, match="pallas_gpu has no sliding window"):
        run("pallas_gpu", q, k, v, table, lengths, 0.125, None, 8)
    with pytest.raises(ValueError, match="N % K != 0"):
        run("xla", q[:, :3], k, v, table, lengths, 0.125, None, None)
    with pytest.raises(ValueError, match="must be \\[S, M\\]"):
        run("xla", q, k, v, table[:2], lengths, 0.125, None, None)


# ----- the Pallas kernels


def needs(impl: str) -> None:
    if NATIVE and jax.default_backend() != PLATFORM[impl]:
        pytest.skip(f"{impl} natively needs a {PLATFORM[impl]}; JAX's backend here is {jax.default_backend()}")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu_paged"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_pallas_kernel_equals_xla_path(impl, family):
    needs(impl)
    _, n, kh, h, softcap, window = family
    if window is not None:  # these kernels have no window: test the family's full-attention layers
        window = None
    q, k, v, table, lengths = make_case(n, kh, h)
    scale = 2.0 ** -round(np.log2(np.sqrt(h)))  # a power of two keeps the pre-scaled queries exact
    want = run("xla", q, k, v, table, lengths, scale, softcap, window)
    got = run(impl, q, k, v, table, lengths, scale, softcap, window)
    err = float(np.max(np.abs(got - want)))
    print(f"{impl} {family[0]}: max abs error {err:.2e}")
    assert err <= TOL
    assert (got[LENGTHS.index(0)] == 0).all()


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu_paged"])
def test_pallas_kernel_is_bitwise_independent_of_stale_pages(impl):
    needs(impl)
    q, k, v, table, lengths = make_case(8, 2, 128, stale=True)
    _, kc, vc, _, _ = make_case(8, 2, 128, stale=False)
    assert not np.array_equal(k, kc)
    stale = run(impl, q, k, v, table, lengths, 0.0625, None, None)
    clean = run(impl, q, kc, vc, table, lengths, 0.0625, None, None)
    assert np.array_equal(stale, clean)


def test_pallas_gpu_kernel_in_bfloat16_is_close_to_the_float32_path():
    needs("pallas_gpu")
    q, k, v, table, lengths = make_case(8, 2, 128)
    want = run("xla", q, k, v, table, lengths, 0.0625, None, None)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    got = run("pallas_gpu", *bf, table, lengths, 0.0625, None, None).astype(np.float32)
    assert np.max(np.abs(got - want)) < 2e-2  # bfloat16 output rounding


def test_pallas_gpu_kernel_at_the_pools_page_size_equals_the_oracle():
    """Pages of 128 positions, the attention block the pool uses (the other tests use 16)."""
    needs("pallas_gpu")
    lengths = [1, 130, 256, 0, 200]
    q, k, v, table, lengths = make_case(8, 2, 128, b=128, m=2, p=9, lengths=lengths)
    want = oracle(q, k, v, table, lengths, 0.0625, 30.0, None)
    got = run("pallas_gpu", q, k, v, table, lengths, 0.0625, 30.0, None)
    assert np.max(np.abs(got - want)) <= TOL


RAGGED_INTERPRET_GAP = ("jax 0.10.2's TPU interpreter cannot run ragged_paged_attention: the kernel reshapes a "
                        "VMEM ref (kv_ref.reshape) and the interpreter reads refs through indexers only "
                        "('ReshapeTransform' object has no attribute 'indices')")


@pytest.fixture(scope="module")
def ragged_runs():
    """Whether the ragged TPU kernel runs here; the known interpreter gap skips, anything else fails."""
    if NATIVE:
        needs("pallas_tpu")
        return
    q, k, v, table, lengths = make_case(8, 2, 128)
    try:
        run("pallas_tpu", q, k, v, table, lengths, 0.0625, None, None)
    except Exception as e:  # the interpreter's error arrives wrapped in a runtime error
        if "ReshapeTransform" in str(e):
            pytest.skip(RAGGED_INTERPRET_GAP)
        raise


@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_pallas_tpu_ragged_kernel_equals_xla_path(family, ragged_runs):
    _, n, kh, h, softcap, window = family
    q, k, v, table, lengths = make_case(n, kh, h)
    scale = 2.0 ** -round(np.log2(np.sqrt(h)))
    want = run("xla", q, k, v, table, lengths, scale, softcap, window)
    got = run("pallas_tpu", q, k, v, table, lengths, scale, softcap, window)
    err = float(np.max(np.abs(got - want)))
    print(f"pallas_tpu {family[0]}: max abs error {err:.2e}")
    assert err <= TOL


ADAPTER_FAMILIES = [f for f in FAMILIES if f[0] in ("smollm2", "gemma2", "mqa8")]  # each pads differently


@pytest.mark.parametrize("family", ADAPTER_FAMILIES, ids=[f[0] for f in ADAPTER_FAMILIES])
def test_ragged_adapter_layout_and_padding_through_the_kernels_own_reference(family, monkeypatch):
    """Where the ragged kernel cannot run, its adapter (interleaved layout, KV heads and head dims
    padded to what the kernel tiles, idle slots) still can: through the jax kernel module's own
    pure-jnp reference, which takes the kernel's inputs."""
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    def reference(*args, num_kv_pages_per_block=None, num_queries_per_block=None, **kw):
        return rpa.ref_ragged_paged_attention(*args, **kw)

    monkeypatch.setattr(ak, "_ragged_kernel", lambda: reference)
    _, n, kh, h, softcap, window = family
    q, k, v, table, lengths = make_case(n, kh, h)
    scale = 1 / np.sqrt(h)
    want = oracle(q, k, v, table, lengths, scale, softcap, window)
    eager = paged_attention.__wrapped__  # the reference loops over sequences in Python: no tracing
    got = np.asarray(eager(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table), jnp.asarray(lengths),
                           scale=scale, softcap=softcap, window=window, impl="pallas_tpu", interpret=False))
    np.testing.assert_allclose(got, want, atol=ORACLE_TOL, rtol=0)
