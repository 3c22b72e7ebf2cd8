"""Rotary position embeddings (RoPE): each layer's inverse frequencies, with Llama-3, linear or
LongRoPE scaling as the config asks, and the rotation itself (HF's rotate-half convention). Used by
``jserve.model``'s layers (and re-exported there)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jserve.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, layer: int = 0) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` (float32) of ``layer``, scaled when the config asks."""
    h = cfg.head_dim
    theta, sc = cfg.rope(layer)
    inv = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    if sc is None:
        return inv.astype(np.float32)
    if sc.kind == "linear":
        return (inv / sc.factor).astype(np.float32)
    if sc.kind == "longrope":
        factors = np.asarray(sc.long_factor if sc.use_long else sc.short_factor, np.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"LongRoPE needs {inv.shape[0]} factors (head_dim / 2), got {factors.shape[0]}")
        return (1.0 / (factors * theta ** (np.arange(0, h, 2, dtype=np.float32) / h))).astype(np.float32)
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_scale(cfg: ModelConfig, layer: int = 0) -> float:
    """What ``layer``'s cos and sin are multiplied by (LongRoPE's attention factor; else 1)."""
    _, sc = cfg.rope(layer)
    return sc.attention_factor if sc is not None and sc.kind == "longrope" else 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotate ``x [..., T, heads, H]`` by ``positions [..., T]`` (HF's rotate-half convention)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, H/2]
    cos = jnp.cos(ang)[..., None, :]
    sin = jnp.sin(ang)[..., None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
