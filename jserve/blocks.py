"""GGUF block formats as a weight leaf type: Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K kept as
they come, multiplied in place.

A ``BlockArray`` is a matrix ``W [N, K]`` (rows are output channels) cut along ``K`` into blocks of
32 values, each block stored with its own float16 scale ``d`` (and, for Q4_1, offset ``m``)::

    q8_0  qs int8  [N, K/32, 32]   value = q * d
    q4_0  qs uint8 [N, K/32, 16]   byte j holds element j (low nibble) and j + 16 (high);
                                   value = (nibble - 8) * d
    q4_1  qs uint8 [N, K/32, 16]   the same nibbles; value = nibble * d + m

which is llama.cpp's layout with the scales pulled out of the byte stream (so a GGUF tensor's
blocks are kept byte for byte). Stacked weights carry leading axes (``[L, N, K/32, B]``).

The K-quants cut ``K`` into super-blocks of 256 values; ``qs`` keeps each ggml super-block's bytes
minus its float16 ``d`` (and ``dmin``, kept as ``m``), which are pulled out as above::

    q4_k  qs uint8 [N, K/256, 140]  scales[12] qs[128]; d, m = dmin float16 [N, K/256];
                                    value = d * sc * nibble - dmin * mn (6-bit sc, mn per 32 values)
    q5_k  qs uint8 [N, K/256, 172]  scales[12] qh[32] qs[128]; d, m = dmin; as q4_k, 5-bit quants
    q6_k  qs uint8 [N, K/256, 208]  ql[128] qh[64] int8 scales[16]; d float16 [N, K/256], no m;
                                    value = d * sc * (q - 32) (6-bit q, one int8 sc per 16 values)

(ggml's order within a block: q4_k / q5_k start with d, dmin; q6_k ends with d.) ``quantize_blocks``
writes only q8_0, q4_0 and q4_1 (``FORMATS``); the K-quants come from GGUF files.

``matmul`` multiplies by such a matrix: on CPU through ``jserve.cpu_kernels`` (row-invariant
kernels reading the blocks) when they are built, otherwise through XLA, dequantizing inside the
jitted step so XLA fuses it into the dot (the GPU/TPU path; XLA:CPU does not fuse it, so a CPU
without the kernels gets the blocks dequantized once at load, see ``multiplied_in_place``).
``take_rows`` looks up embedding rows, dequantizing only the rows gathered. ``quantize_blocks``
turns float weights into blocks with llama.cpp's reference rounding (checked against the ``gguf``
package in tests/test_blocks.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

FORMATS = ("q8_0", "q4_0", "q4_1")  # the formats quantize_blocks writes (the --quantize modes)
KQUANTS = ("q4_k", "q5_k", "q6_k")  # read from GGUF files only
ALL_FORMATS = FORMATS + KQUANTS
BLOCK = 32  # values per block (q8_0, q4_0, q4_1)
KBLOCK = 256  # values per K-quant super-block
QS_WIDTH = {"q8_0": 32, "q4_0": 16, "q4_1": 16, "q4_k": 140, "q5_k": 172, "q6_k": 208}  # qs bytes per block
QS_DTYPE = {"q8_0": np.int8, "q4_0": np.uint8, "q4_1": np.uint8, "q4_k": np.uint8, "q5_k": np.uint8,
            "q6_k": np.uint8}
WITH_M = ("q4_1", "q4_k", "q5_k")  # formats with an ``m`` (q4_1's offset, the K-quants' dmin)
# GGUF tensor type names of the formats kept as blocks.
GGUF_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}


def block_values(fmt: str) -> int:
    """Values of ``K`` per block (per row of ``d``): 256 for the K-quants, else 32."""
    return KBLOCK if fmt in KQUANTS else BLOCK


@struct.dataclass
class BlockArray:
    """A block-quantized matrix ``[..., N, K]``: ``qs [..., N, K/32, B]``, ``d`` (and ``m`` for
    q4_1) float16 ``[..., N, K/32]``. Holds numpy arrays on the host or jax arrays on device.
    Format ``f32`` is a float32 matrix ``qs [N, K]`` (no ``d``) multiplied through the same
    row-invariant CPU kernels (``float_for_kernels``).

    ``kernel``: whether ``matmul`` may use the CPU kernels (False forces the XLA path, which
    the tests compare against)."""

    qs: jax.Array
    d: jax.Array
    m: jax.Array | None = None
    fmt: str = struct.field(pytree_node=False, default="q8_0")
    kernel: bool = struct.field(pytree_node=False, default=True)
    # A view of one layer of weights stacked over layers (``qs [L, ...]``): that layer's index (traced
    # inside a loop over layers), which the kernels read in place; None for a matrix of its own.
    layer: jax.Array | int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape ``[..., N, K]`` (of the one layer, for a view)."""
        qs = self.qs.shape[1:] if self.layer is not None else self.qs.shape
        if self.fmt == "f32":
            return tuple(qs)
        return (*qs[:-2], qs[-2] * block_values(self.fmt))

    def own(self) -> BlockArray:
        """A view's layer as a matrix of its own (a copy: the XLA path, never the kernels')."""
        if self.layer is None:
            return self
        return self.map_rows(lambda a: a[self.layer]).replace(layer=None)

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (self.qs, self.d, self.m) if x is not None)

    def map_rows(self, fn) -> BlockArray:
        """``fn`` applied to every part (each has the rows, and any leading axes, first)."""
        return self.replace(qs=fn(self.qs), d=None if self.d is None else fn(self.d),
                            m=None if self.m is None else fn(self.m))


def check_format(fmt: str, known: tuple[str, ...] = ALL_FORMATS) -> None:
    if fmt not in known:
        raise ValueError(f"unknown block format {fmt!r} (known: {', '.join(known)})")


def from_gguf_bytes(raw: np.ndarray, fmt: str) -> BlockArray:
    """A GGUF tensor's data ``uint8 [..., N, bytes per row]`` as blocks (no copy of the values'
    meaning: the bytes are only regrouped)."""
    check_format(fmt)
    head = 4 if fmt in WITH_M else 2
    raw = np.ascontiguousarray(raw).view(np.uint8)
    blocks = raw.reshape(*raw.shape[:-1], -1, head + QS_WIDTH[fmt])
    if fmt == "q6_k":  # d last
        d = np.ascontiguousarray(blocks[..., 208:210]).view(np.float16)[..., 0]
        return BlockArray(qs=np.ascontiguousarray(blocks[..., :208]), d=d, m=None, fmt=fmt)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if fmt in WITH_M else None
    qs = np.ascontiguousarray(blocks[..., head:]).view(QS_DTYPE[fmt])
    return BlockArray(qs=qs, d=d, m=m, fmt=fmt)


def to_gguf_bytes(b: BlockArray) -> np.ndarray:
    """The inverse of ``from_gguf_bytes``: ``uint8 [..., N, bytes per row]`` as GGUF stores it."""
    parts = [np.asarray(b.d, np.float16)[..., None].view(np.uint8)]
    if b.m is not None:
        parts.append(np.asarray(b.m, np.float16)[..., None].view(np.uint8))
    parts.append(np.asarray(b.qs).view(np.uint8))
    if b.fmt == "q6_k":
        parts = parts[::-1]  # ql, qh, scales, then d
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(*blocks.shape[:-2], -1)


def quantize_blocks(w: np.ndarray, fmt: str) -> BlockArray:
    """Float ``w [..., N, K]`` (``K`` a multiple of 32) → blocks, on the host, rounding as
    llama.cpp's reference quantizers do (scales computed in float32, stored as float16):

    - q8_0: ``d = max|x| / 127``, ``q = round(x / d)`` (halves away from zero);
    - q4_0: ``d = -x* / 8`` where ``x*`` is the value of largest magnitude (sign kept),
      ``q = min(15, trunc(x / d + 8.5))``;
    - q4_1: ``d = (max - min) / 15``, ``m = min``, ``q = min(15, trunc((x - min) / d + 0.5))``.
    """
    check_format(fmt, FORMATS)
    w = np.asarray(w, np.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"block formats need the inner dimension to be a multiple of {BLOCK}, got {w.shape[-1]}")
    x = w.reshape(*w.shape[:-1], -1, BLOCK)
    m = None
    with np.errstate(divide="ignore"):
        if fmt == "q8_0":
            d = np.max(np.abs(x), axis=-1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            y = x * inv
            qs = (np.sign(y) * np.floor(np.abs(y) + np.float32(0.5))).astype(np.int8)
        elif fmt == "q4_0":
            peak = np.take_along_axis(x, np.argmax(np.abs(x), axis=-1)[..., None], axis=-1)
            d = peak / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            nib = np.minimum(np.trunc(x * inv + np.float32(8.5)), 15).astype(np.uint8)
            qs = _pack_nibbles(nib)
        else:
            lo, hi = np.min(x, axis=-1, keepdims=True), np.max(x, axis=-1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            nib = np.clip(np.trunc((x - lo) * inv + np.float32(0.5)), 0, 15).astype(np.uint8)
            qs, m = _pack_nibbles(nib), lo[..., 0].astype(np.float16)
    return BlockArray(qs=qs, d=d[..., 0].astype(np.float16), m=m, fmt=fmt)


def _pack_nibbles(nib: np.ndarray) -> np.ndarray:
    """``[..., 32]`` values 0..15 → ``[..., 16]`` bytes: element j low, element j + 16 high."""
    return (nib[..., :16] | (nib[..., 16:] << 4)).astype(np.uint8)


def dequantize_blocks(b: BlockArray, dtype=jnp.float32) -> jax.Array | np.ndarray:
    """Blocks → float ``[..., N, K]``. With numpy parts it runs in numpy (a load on the host);
    with jax arrays it is plain jnp ops, which XLA fuses into whatever consumes them."""
    xp = np if isinstance(b.qs, np.ndarray) else jnp
    if b.fmt == "f32":
        return b.qs.astype(dtype)
    if b.fmt in KQUANTS:
        return _dequantize_kquant(b, xp).astype(dtype)
    d = b.d.astype(xp.float32)[..., None]
    if b.fmt == "q8_0":
        x = b.qs.astype(xp.float32) * d
    else:
        nib = xp.concatenate([b.qs & 15, b.qs >> 4], axis=-1).astype(xp.float32)
        x = (nib - 8) * d if b.fmt == "q4_0" else nib * d + b.m.astype(xp.float32)[..., None]
    return x.reshape(*x.shape[:-2], -1).astype(dtype)


def _dequantize_kquant(b: BlockArray, xp) -> jax.Array | np.ndarray:
    """K-quant blocks → float32 ``[..., N, K]`` with ggml's formulas in float32 (``d * sc`` and
    ``dmin * mn`` are exact products, so each value is rounded once, as gguf.quants rounds it)."""
    qs = b.qs
    lead = qs.shape[:-1]  # [..., N, S]
    d = b.d.astype(xp.float32)[..., None]  # [..., N, S, 1]
    if b.fmt == "q6_k":
        ql = qs[..., :128].reshape(*lead, 2, 1, 64)
        lo = ((ql >> xp.asarray([0, 4], xp.uint8).reshape(2, 1)) & 15).reshape(*lead, 8, 32)
        qh = qs[..., 128:192].reshape(*lead, 2, 1, 32)
        hi = ((qh >> xp.asarray([0, 2, 4, 6], xp.uint8).reshape(4, 1)) & 3).reshape(*lead, 8, 32)
        q = (lo | (hi << 4)).astype(xp.int32) - 32
        sc = qs[..., 192:208].astype(xp.int32)
        sc = (sc - 256 * (sc >= 128)).astype(xp.float32)  # int8
        x = (d * sc)[..., None] * q.reshape(*lead, 16, 16).astype(xp.float32)
        return x.reshape(*lead[:-1], -1)
    scales = qs[..., :12].reshape(*lead, 3, 4)
    dd, mm, md = scales[..., 0, :], scales[..., 1, :], scales[..., 2, :]
    sc = xp.concatenate([dd & 63, (md & 15) | ((dd >> 2) & 48)], axis=-1).astype(xp.float32)  # [..., N, S, 8]
    mn = xp.concatenate([mm & 63, (md >> 4) | ((mm >> 2) & 48)], axis=-1).astype(xp.float32)
    start = 12 if b.fmt == "q4_k" else 44
    ql = qs[..., start:start + 128].reshape(*lead, 4, 1, 32)
    q = ((ql >> xp.asarray([0, 4], xp.uint8).reshape(2, 1)) & 15).reshape(*lead, 8, 32)
    if b.fmt == "q5_k":
        qh = qs[..., 12:44].reshape(*lead, 1, 32)
        q = q | (((qh >> xp.arange(8, dtype=xp.uint8).reshape(8, 1)) & 1) << 4)
    x = (d * sc)[..., None] * q.astype(xp.float32) - (b.m.astype(xp.float32)[..., None] * mn)[..., None]
    return x.reshape(*lead[:-1], -1)


def concat_rows(parts: list[BlockArray], groups: int = 1) -> BlockArray:
    """Blocks of matrices ``[N_i, K]`` (one format) stacked along their rows, in ``groups``
    interleaved blocks as ``sharding.fuse`` lays out columns of float matrices ``[K, N]``."""
    fmt = parts[0].fmt
    if any(p.fmt != fmt for p in parts):
        raise ValueError(f"cannot concatenate blocks of formats {[p.fmt for p in parts]}")
    xp = np if isinstance(parts[0].qs, np.ndarray) else jnp

    def cat(arrays):
        split = [a.reshape(groups, a.shape[0] // groups, *a.shape[1:]) for a in arrays]
        out = xp.concatenate(split, axis=1)
        return out.reshape(-1, *out.shape[2:])

    m = None if parts[0].m is None else cat([p.m for p in parts])
    return BlockArray(qs=cat([p.qs for p in parts]), d=cat([p.d for p in parts]), m=m, fmt=fmt, kernel=parts[0].kernel)


def to_device(b: BlockArray) -> BlockArray:
    return b.map_rows(jnp.asarray)


def _kernels():
    """``jserve.cpu_kernels`` when it is there and built for this CPU, else None."""
    if jax.default_backend() != "cpu":
        return None
    try:
        from jserve import cpu_kernels
    except ImportError:
        return None
    return cpu_kernels if cpu_kernels.available() else None


def matmul(x: jax.Array, w: BlockArray) -> jax.Array:
    """``x [..., K] @ w.T`` → ``[..., N]`` in ``x``'s dtype, ``w`` a ``[N, K]`` ``BlockArray``."""
    kernels = _kernels() if w.kernel else None
    if kernels is not None:
        out = kernels.matmul(x.astype(jnp.float32), w.fmt, w.qs, w.d, w.m, layer=w.layer)
        return out.astype(x.dtype)
    wf = dequantize_blocks(w.own(), x.dtype)
    return jax.lax.dot_general(x, wf, (((x.ndim - 1,), (1,)), ((), ())))


def fuses(x: jax.Array, w: object) -> bool:
    """Whether ``matmul_fused`` runs ``w``'s product with its neighbours inside one kernel call here:
    a ``BlockArray`` through the CPU kernels and float32 activations. Else callers run them apart."""
    return (isinstance(w, BlockArray) and w.kernel and x.dtype == jnp.float32
            and w.qs.ndim - (w.layer is not None) in (2, 3) and _kernels() is not None)


def matmul_fused(x: jax.Array, w: BlockArray, **fused) -> jax.Array:
    """``matmul`` with a layer's elementwise neighbours folded into the kernel call (``fuses`` must
    hold): ``norm``/``eps`` (an RMSNorm of x first), ``residual`` (added to the product); see
    ``cpu_kernels.matmul_isa``."""
    return _kernels().matmul(x, w.fmt, w.qs, w.d, w.m, layer=w.layer, **fused)


def float_for_kernels(w: jax.Array, transpose: bool = True) -> jax.Array | BlockArray:
    """A float32 matrix ``w [K, N]`` (``[N, K]`` with ``transpose=False``) as an ``f32`` ``BlockArray``
    ``qs [N, K]``, so ``matmul`` multiplies it through the row-invariant CPU kernels; anything else
    (another dtype, stacked experts, no kernels here) is returned as it is."""
    if _kernels() is None or not isinstance(w, jax.Array | np.ndarray) or w.ndim != 2 or w.dtype != np.float32:
        return w
    return BlockArray(qs=jnp.asarray(w).T if transpose else jnp.asarray(w), d=None, fmt="f32")


def take_rows(w: BlockArray, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows ``ids [...]`` of ``w [V, D]`` → ``[..., D]``: only the gathered rows are dequantized."""
    rows = w.map_rows(lambda a: jnp.take(a, ids, axis=0, mode="clip"))
    return dequantize_blocks(rows, dtype)


def kernels_loaded() -> bool:
    """Whether ``matmul`` runs the row-invariant CPU kernels here (for ``BlockArray`` weights)."""
    return _kernels() is not None


def multiplied_in_place() -> bool:
    """Whether ``matmul`` reads blocks at full speed here: on GPU/TPU (XLA fuses the dequantize into
    the dot), or on CPU with the kernels. XLA:CPU does not fuse it: there the XLA path measured
    ~15x slower than float32 (SmolLM2, one row), so a load there dequantizes once instead."""
    return jax.default_backend() != "cpu" or _kernels() is not None


def describe() -> str:
    """Which path ``matmul`` takes here, for the log."""
    kernels = _kernels()
    if kernels is not None:
        return f"CPU kernels ({kernels.describe()})"
    return "XLA (dequantized inside the step, fused into the dot)"
