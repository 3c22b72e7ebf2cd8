"""The one matmul helper the model uses for every weight.

Keeping all weight products behind ``dense`` lets a quantized weight become another leaf
type later without touching the model's math.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, transpose: bool = False) -> jax.Array:
    """``x [..., I] @ w [I, O]`` (or ``w [O, I]`` with ``transpose``) → ``[..., O]``."""
    contract = 1 if transpose else 0
    return jax.lax.dot_general(
        x.astype(w.dtype), w, (((x.ndim - 1,), (contract,)), ((), ())),
        preferred_element_type=x.dtype if x.dtype == jnp.float32 else None,
    )
