"""jserve checkpoints on disk: an orbax pytree of weights plus config and tokenizer.

Layout of a checkpoint directory::

    config.json             ModelConfig
    params/                 orbax (StandardCheckpointer) tree of stacked, unfused weights
    tokenizer.json          tokenizers' format (optional: without it only token ids are accepted)
    tokenizer_config.json   chat template and special token ids

Weights are stored unfused and stacked over layers, each matrix as ``[in, out]``::

    embed [V, D]   final_norm [D]   lm_head [D, V] (untied models only)
    attn_norm, mlp_norm [L, D]
    wq [L, D, N H]   wk, wv [L, D, K H]   wo [L, N H, D]
    w_gate, w_up [L, D, F]   w_down [L, F, D]

so a sharded load can read just a slice of each; fusing (Q/K/V, gate/up) happens at load.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jserve.config import ModelConfig
from jserve.model import LayerParams, Params
from jserve.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]
LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    el, d, f, h = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.head_dim
    shapes = {
        "embed": (cfg.vocab_size, d), "final_norm": (d,),
        "attn_norm": (el, d), "mlp_norm": (el, d),
        "wq": (el, d, cfg.n_heads * h), "wk": (el, d, cfg.n_kv_heads * h), "wv": (el, d, cfg.n_kv_heads * h),
        "wo": (el, cfg.n_heads * h, d), "w_gate": (el, d, f), "w_up": (el, d, f), "w_down": (el, f, d),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def check_weights(cfg: ModelConfig, weights: Weights) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ValueError(f"checkpoint weights do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(weights[name].shape)}, config implies {shape}")


def is_complete(directory: pathlib.Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "params" / "_CHECKPOINT_METADATA").is_file()


def save(directory: pathlib.Path, cfg: ModelConfig, weights: Weights, tokenizer: TextTokenizer | None) -> None:
    """Write a checkpoint atomically: into a temporary sibling, then renamed into place."""
    check_weights(cfg, weights)
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", {k: np.asarray(v, np.float32) for k, v in weights.items()})
        cfg.save(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_config(directory: pathlib.Path) -> ModelConfig:
    if not is_complete(directory):
        raise FileNotFoundError(f"no jserve checkpoint at {directory} (expected config.json and params/)")
    return ModelConfig.load(directory / "config.json")


def load_weights(directory: pathlib.Path) -> tuple[ModelConfig, Weights]:
    cfg = load_config(directory)
    with ocp.StandardCheckpointer() as ckpt:
        weights = ckpt.restore(directory.resolve() / "params")
    weights = {k: np.asarray(v) for k, v in weights.items()}
    check_weights(cfg, weights)
    return cfg, weights


def load_tokenizer(directory: pathlib.Path) -> TextTokenizer | None:
    if (directory / "tokenizer.json").is_file():
        return TextTokenizer.load(directory)
    return None


def to_params(cfg: ModelConfig, weights: Weights, dtype: jnp.dtype = jnp.float32) -> Params:
    """Fuse and cast stacked checkpoint weights into the model's ``Params`` on device."""
    check_weights(cfg, weights)

    def put(x: np.ndarray) -> jax.Array:
        return jnp.asarray(np.asarray(x, np.float32).astype(dtype))

    layers = []
    for i in range(cfg.n_layers):
        w = {k: weights[k][i] for k in LAYER_KEYS}
        layers.append(LayerParams(
            attn_norm=put(w["attn_norm"]),
            wqkv=put(np.concatenate([w["wq"], w["wk"], w["wv"]], axis=1)),
            wo=put(w["wo"]),
            mlp_norm=put(w["mlp_norm"]),
            w_gate_up=put(np.concatenate([w["w_gate"], w["w_up"]], axis=1)),
            w_down=put(w["w_down"]),
        ))
    lm_head = None if cfg.tie_embeddings else put(weights["lm_head"])
    return Params(embed=put(weights["embed"]), layers=tuple(layers),
                  final_norm=put(weights["final_norm"]), lm_head=lm_head)


def load(directory: pathlib.Path, dtype: jnp.dtype = jnp.float32) -> tuple[ModelConfig, Params, TextTokenizer | None]:
    """Config, device params and tokenizer (``None`` if the checkpoint has none) of a checkpoint."""
    cfg, weights = load_weights(directory)
    return cfg, to_params(cfg, weights, dtype), load_tokenizer(directory)
