"""Weights as the model multiplies them: plain arrays, or int8 with per-output-channel scales.

Every weight product in the model goes through ``dense`` (and embedding lookups through
``take_rows``), so a quantized weight is just another pytree leaf type and the model's math
reads the same for float and int8.

Modes (``QuantArray.mode``):

- ``int8``: weight-only. Activations stay float; the int8 weight is converted inside the
  step, which XLA fuses into the matmul on GPU/TPU.
- ``int8-dynamic``: activations are also quantized, per row (symmetric, absmax), and the
  product is an int8 x int8 -> int32 matmul rescaled by both scales. On XLA:CPU this keeps the
  fast matmul path that a convert inside the step loses (see ../shared/DESIGN.md); it costs
  some accuracy, which ``scripts/eval_quality.py`` reports.
- ``q8_0``, ``q4_0``, ``q4_1``: GGUF's block formats (``jserve/blocks.py``), group-wise int8 and
  int4 with a float16 scale (and offset) per 32 values. A GGUF checkpoint keeps its own blocks;
  these modes quantize float weights into them at load.
- ``float``: every weight as a float array (a block or int8 checkpoint dequantized at load), to
  compare quality against the stored format.

Without a mode a checkpoint is served as stored.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jserve.blocks import FORMATS as BLOCK_FORMATS
from jserve.blocks import BlockArray
from jserve.blocks import matmul as block_matmul
from jserve.blocks import take_rows as block_take_rows

INT8_MODES = ("int8", "int8-dynamic")
MODES = (*INT8_MODES, *BLOCK_FORMATS, "float")


@struct.dataclass
class QuantArray:
    """``q`` int8 with the float weight's shape; ``scale`` float32, one per output channel.

    ``out_axis`` names the output-channel axis of ``q``: 1 for ``[I, O]`` matrices, 0 for
    ``[V, D]`` embeddings (whose rows are the outputs of a tied output projection).
    """

    q: jax.Array
    scale: jax.Array
    mode: str = struct.field(pytree_node=False, default="int8")
    out_axis: int = struct.field(pytree_node=False, default=1)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (known: {', '.join(MODES)})")


def quantize_np(w: np.ndarray, out_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of a ``[..., I, O]`` (or ``[..., O, I]`` with
    ``out_axis=0``) matrix: ``(q, scale)`` with ``|w - q * s| <= s / 2``. On the host (numpy),
    or on device for a ``jax.Array`` (rounding half to even either way, so both agree)."""
    xp = jnp if isinstance(w, jax.Array) else np  # a traced array inside a sharded load, else numpy
    w = xp.asarray(w, xp.float32)
    contract = w.ndim - 2 + (1 - out_axis)
    amax = xp.max(xp.abs(w), axis=contract, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
    return q, xp.squeeze(scale, axis=contract)


def quantize(w: np.ndarray, out_axis: int = 1, mode: str = "int8") -> QuantArray:
    """A ``QuantArray`` on device from a float matrix on the host."""
    check_mode(mode)
    q, scale = quantize_np(w, out_axis)
    return QuantArray(q=jnp.asarray(q), scale=jnp.asarray(scale), mode=mode, out_axis=out_axis)


def dequantize(w: QuantArray) -> jax.Array:
    s = w.scale[None, :] if w.out_axis == 1 else w.scale[:, None]
    return w.q.astype(jnp.float32) * s


def _dot(x: jax.Array, w: jax.Array, contract: int, out_type=None) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (contract,)), ((), ())), preferred_element_type=out_type)


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Activations as int8 with one symmetric (absmax) scale per row: ``(q, scale [..., 1])``."""
    xf = x.astype(jnp.float32)
    xs = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    xs = jnp.where(xs > 0, xs, 1.0)
    return jnp.clip(jnp.round(xf / xs), -127, 127).astype(jnp.int8), xs


def dense(x: jax.Array, w: jax.Array | QuantArray | BlockArray, transpose: bool = False) -> jax.Array:
    """``x [..., I] @ w [I, O]`` (or ``w [O, I]`` with ``transpose``) → ``[..., O]`` in ``x``'s dtype.
    A ``BlockArray`` is always ``[O, I]`` (rows are outputs), whatever ``transpose`` says."""
    if isinstance(w, BlockArray):
        return block_matmul(x, w)
    contract = 1 if transpose else 0
    if not isinstance(w, QuantArray):
        return _dot(x.astype(w.dtype), w, contract)
    if w.mode == "int8-dynamic" and math.prod(x.shape[:-1]) == 1:
        # XLA:CPU's fast int8 path needs two rows or more; a zero row costs next to nothing.
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        return dense(x2, w, transpose)[:1].reshape(*x.shape[:-1], -1)
    if w.mode == "int8-dynamic":
        xq, xs = _quantize_rows(x)
        acc = _dot(xq, w.q, contract, jnp.int32)
        return (acc.astype(jnp.float32) * xs * w.scale).astype(x.dtype)
    return (_dot(x, w.q.astype(x.dtype), contract) * w.scale.astype(x.dtype)).astype(x.dtype)


def dense_experts(x: jax.Array, w: jax.Array | QuantArray) -> jax.Array:
    """Every expert's product at once: ``x [E, M, I] @ w [E, I, O]`` → ``[E, M, O]`` in ``x``'s
    dtype (a quantized ``w`` has one scale per expert and output channel, ``[E, O]``)."""
    dims = (((2,), (1,)), ((0,), (0,)))
    if not isinstance(w, QuantArray):
        return jax.lax.dot_general(x.astype(w.dtype), w, dims)
    scale = w.scale[:, None, :]
    if w.mode == "int8-dynamic":
        xq, xs = _quantize_rows(x)
        acc = jax.lax.dot_general(xq, w.q, dims, preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * xs * scale).astype(x.dtype)
    return (jax.lax.dot_general(x, w.q.astype(x.dtype), dims) * scale.astype(x.dtype)).astype(x.dtype)


def take_rows(w: jax.Array | QuantArray | BlockArray, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Embedding lookup ``w [V, D]`` at ``ids`` → ``[..., D]`` (out-of-range ids clipped)."""
    if isinstance(w, BlockArray):
        return block_take_rows(w, ids, dtype)
    if not isinstance(w, QuantArray):
        return jnp.take(w, ids, axis=0, mode="clip")
    rows = jnp.take(w.q, ids, axis=0, mode="clip").astype(jnp.float32)
    return (rows * jnp.take(w.scale, ids, mode="clip")[..., None]).astype(dtype)


def weight_bytes(tree: object) -> int:
    """Bytes of all arrays in a pytree (int8 weights and their scales, blocks, the float rest)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def weight_format(tree: object) -> str | None:
    """The quantized formats among a pytree's weights (``"int8"``, ``"q4_1+q8_0"``), None if all float."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, (QuantArray, BlockArray)))
    found = {x.mode if isinstance(x, QuantArray) else x.fmt for x in leaves if isinstance(x, (QuantArray, BlockArray))}
    return "+".join(sorted(found)) or None
