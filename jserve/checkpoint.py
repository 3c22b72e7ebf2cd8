"""jserve checkpoints on disk: an orbax pytree of weights plus config and tokenizer.

Layout of a checkpoint directory::

    config.json             ModelConfig
    params/                 orbax (StandardCheckpointer) tree of stacked, unfused weights
    quantization.json       only in int8 checkpoints: {"quantization": "int8"}
    weights.json            {"format_version": 2, "formats": {matrix: block format}}
    tokenizer.json          tokenizers' format (optional: without it only token ids are accepted)
    tokenizer_config.json   chat template and special token ids

Weights are stored unfused and stacked over layers, each matrix as ``[in, out]``::

    embed [V, D]   final_norm [D]   lm_head [D, V] (untied models only)
    attn_norm, mlp_norm [L, D]
    wq [L, D, N H]   wk, wv [L, D, K H]   wo [L, N H, D]
    w_gate, w_up [L, D, F]   w_down [L, F, D]

and, in the families that have them (``ModelConfig``'s fields say which)::

    bq [L, N H]   bk, bv [L, K H]              (qkv_bias)
    q_norm, k_norm [L, H]                      (qk_norm)
    post_attn_norm, post_mlp_norm [L, D]       (post_norms)
    router [L, D, E]   e_gate, e_up [L, E, D, F]   e_down [L, E, F, D]   (n_experts > 0, in place
                                                                        of w_gate, w_up, w_down)

Norm weights are stored as the model multiplies them (Gemma's ``1 + w`` is added on import),
so a sharded load can read just a slice of each; fusing (Q/K/V, gate/up) happens at load.
An int8 checkpoint stores each matrix above as int8 plus ``<name>_scale`` (float32, one per
output channel: ``[L, O]``, ``[V]`` for ``embed``).

A matrix in a GGUF block format (``jserve/blocks.py``: q8_0, q4_0, q4_1) is stored as its blocks,
rows = output channels (``[..., O, I]``, i.e. transposed against the float layout above):
``<name>`` the quantized values ``[..., O, I/32, B]`` (int8 for q8_0, uint8 for the 4-bit
formats), ``<name>_d`` the float16 scales ``[..., O, I/32]`` and, for q4_1, ``<name>_m`` the
float16 offsets. The K-quants (q4_k, q5_k, q6_k) alike per 256 values: ``[..., O, I/256, B]``
uint8 (B = 140, 172, 208 says which), ``_d`` ``[..., O, I/256]``, ``_m`` the dmin of q4_k / q5_k.
The arrays say the format (see ``block_format``); ``weights.json`` records it
per matrix, with the checkpoint format's version (1 before block formats existed).
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jserve import blocks
from jserve.blocks import BlockArray, concat_rows, dequantize_blocks, quantize_blocks
from jserve.config import ModelConfig
from jserve.model import LayerParams, Params
from jserve.quant import BLOCK_FORMATS, INT8_MODES, QuantArray, check_mode, quantize_np
from jserve.quant import quantize as quantize_matrix
from jserve.sharding import Plan, fuse, params_sharding, stored_sharding
from jserve.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]
LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
# Matrices that int8 quantization covers, and their output-channel axis (of the last two axes).
# The router stays float: it is small, and which experts a token gets should not move with rounding.
QUANTIZED_KEYS = {"wq": 1, "wk": 1, "wv": 1, "wo": 1, "w_gate": 1, "w_up": 1, "w_down": 1, "embed": 0, "lm_head": 1,
                  "e_gate": 1, "e_up": 1, "e_down": 1}
SCALE = "_scale"
BLOCK_D, BLOCK_M = "_d", "_m"  # a block matrix's float16 scales and (q4_1) offsets
CHUNK_BYTES = 4 << 20
# 2: GGUF block formats are kept as blocks (1: every GGUF tensor was dequantized to float32).
FORMAT_VERSION = 2


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    el, d, f, h, e = cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.head_dim, cfg.n_experts
    nq, nk = cfg.n_heads * h, cfg.n_kv_heads * h
    shapes = {
        "embed": (cfg.vocab_size, d), "final_norm": (d,),
        "attn_norm": (el, d), "mlp_norm": (el, d),
        "wq": (el, d, nq), "wk": (el, d, nk), "wv": (el, d, nk), "wo": (el, nq, d),
    }
    if e:
        shapes.update(router=(el, d, e), e_gate=(el, e, d, f), e_up=(el, e, d, f), e_down=(el, e, f, d))
    else:
        shapes.update(w_gate=(el, d, f), w_up=(el, d, f), w_down=(el, f, d))
    if cfg.qkv_bias:
        shapes.update(bq=(el, nq), bk=(el, nk), bv=(el, nk))
    if cfg.qk_norm:
        shapes.update(q_norm=(el, h), k_norm=(el, h))
    if cfg.post_norms:
        shapes.update(post_attn_norm=(el, d), post_mlp_norm=(el, d))
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def random_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    """Random weights (``model.init_params``) in the stored layout: a model for tests and benchmarks."""
    from jserve.model import init_params

    p = init_params(cfg, jax.random.PRNGKey(seed))
    nq, nk, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim

    def stack(get) -> np.ndarray:
        return np.stack([np.asarray(get(layer)) for layer in p.layers])

    w = {
        "attn_norm": stack(lambda x: x.attn_norm), "mlp_norm": stack(lambda x: x.mlp_norm),
        "wq": stack(lambda x: x.wqkv[:, :nq]), "wk": stack(lambda x: x.wqkv[:, nq:nq + nk]),
        "wv": stack(lambda x: x.wqkv[:, nq + nk:]), "wo": stack(lambda x: x.wo),
        "w_gate": stack(lambda x: x.w_gate_up[:, :f]), "w_up": stack(lambda x: x.w_gate_up[:, f:]),
        "w_down": stack(lambda x: x.w_down), "embed": np.asarray(p.embed), "final_norm": np.asarray(p.final_norm),
    }
    if p.lm_head is not None:
        w["lm_head"] = np.asarray(p.lm_head)
    return w


def is_quantized(weights: Weights) -> bool:
    return "wq" + SCALE in weights


def block_format(weights: Weights, key: str) -> str | None:
    """The block format of stored matrix ``key`` (None for a float or int8 matrix)."""
    if key + BLOCK_D not in weights:
        return None
    if weights[key].dtype == np.int8:
        return "q8_0"
    width = weights[key].shape[-1]  # the K-quants' qs widths (140, 172, 208) are their own
    kquant = {w: f for f, w in blocks.QS_WIDTH.items() if f in blocks.KQUANTS}.get(width)
    if kquant is not None:
        return kquant
    return "q4_1" if key + BLOCK_M in weights else "q4_0"


def stored_blocks(weights: Weights, key: str, index: int | None = None) -> BlockArray:
    """Stored block matrix ``key`` (layer ``index`` of it) as a ``BlockArray`` ``[..., O, I]``."""
    def get(name: str):
        return weights[name] if index is None else weights[name][index]

    m = get(key + BLOCK_M) if key + BLOCK_M in weights else None
    return BlockArray(qs=get(key), d=get(key + BLOCK_D), m=m, fmt=block_format(weights, key))


def put_blocks(weights: Weights, key: str, b: BlockArray) -> None:
    """Store ``b`` (``[..., O, I]``) as matrix ``key``'s blocks."""
    weights[key], weights[key + BLOCK_D] = b.qs, b.d
    if b.m is not None:
        weights[key + BLOCK_M] = b.m


def block_keys(weights: Weights) -> dict[str, str]:
    """Every stored block matrix and its format."""
    return {k: f for k in QUANTIZED_KEYS if k in weights and (f := block_format(weights, k)) is not None}


def float_matrix(weights: Weights, key: str, index: int | None = None):
    """Stored matrix ``key`` (layer ``index`` of it) as float in the stored float layout, whatever
    its stored format (blocks and int8 are dequantized; numpy stays numpy, jax stays jax)."""
    w = weights[key] if index is None else weights[key][index]
    axis = QUANTIZED_KEYS[key]
    if block_format(weights, key) is not None:
        x = dequantize_blocks(stored_blocks(weights, key, index), np.float32)
        return x.swapaxes(-1, -2) if axis == 1 else x
    if key + SCALE in weights:
        s = weights[key + SCALE] if index is None else weights[key + SCALE][index]
        s = s[..., None, :] if axis == 1 else s[..., :, None]
        return w.astype(np.float32) * s
    return w


def float_weights(weights: Weights) -> Weights:
    """Every block matrix dequantized to float32 in the stored float layout (host, numpy)."""
    out = dict(weights)
    for key in block_keys(weights):
        out[key] = float_matrix(weights, key)
        out.pop(key + BLOCK_D), out.pop(key + BLOCK_M, None)
    return out


def quantize_weights(cfg: ModelConfig, weights: Weights) -> Weights:
    """int8 + per-output-channel scales for every matrix (host side, numpy)."""
    out = float_weights(weights)
    for key, axis in QUANTIZED_KEYS.items():
        if key in out:
            out[key], out[key + SCALE] = quantize_np(out[key], axis)
    return out


def check_weights(cfg: ModelConfig, weights: Weights) -> None:
    want = expected_shapes(cfg)
    for key, fmt in block_keys(weights).items():
        shape, axis = want[key], QUANTIZED_KEYS[key]
        o, i = shape[-2 + axis], shape[-1 - axis]
        per = blocks.block_values(fmt)
        want[key], want[key + BLOCK_D] = (*shape[:-2], o, i // per, blocks.QS_WIDTH[fmt]), (*shape[:-2], o, i // per)
        if fmt in blocks.WITH_M:
            want[key + BLOCK_M] = want[key + BLOCK_D]
    if is_quantized(weights):
        for key, axis in QUANTIZED_KEYS.items():
            if key in want:
                shape = want[key]
                want[key + SCALE] = (shape[:-2] if len(shape) > 2 else ()) + (shape[-2 + axis],)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ValueError(f"checkpoint weights do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(weights[name].shape)}, config implies {shape}")


def is_complete(directory: pathlib.Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "params" / "_CHECKPOINT_METADATA").is_file()


def format_version(directory: pathlib.Path) -> int:
    """The checkpoint format's version (``FORMAT_VERSION`` for checkpoints written today)."""
    path = directory / "weights.json"
    return int(json.loads(path.read_text())["format_version"]) if path.is_file() else 1


def save(directory: pathlib.Path, cfg: ModelConfig, weights: Weights, tokenizer: TextTokenizer | None) -> None:
    """Write a checkpoint atomically: into a temporary sibling, then renamed into place."""
    check_weights(cfg, weights)
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        kept = (np.int8, np.uint8, np.float16)  # int8 / block values and block scales stay as they are
        arrays = {k: v if v.dtype in kept else np.asarray(v, np.float32) for k, v in weights.items()}
        # Stored in chunks of at most CHUNK_BYTES, so a sharded load reads about its own shard,
        # not every array whole.
        chunked = {k: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for k in arrays}
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", arrays, save_args=chunked)
        cfg.save(tmp / "config.json")
        if is_quantized(weights):
            (tmp / "quantization.json").write_text(json.dumps({"quantization": "int8"}))
        (tmp / "weights.json").write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                      "formats": block_keys(weights)}))
        if tokenizer is not None:
            tokenizer.save(tmp)
        # The old checkpoint moves aside and the new one in: two renames, so a reader finds one
        # or the other whole (never a half-deleted one).
        old = directory.with_name(f".{directory.name}.old-{tmp.name}") if directory.exists() else None
        if old is not None:
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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


def to_params(cfg: ModelConfig, weights: Weights, dtype: jnp.dtype = jnp.float32,
              quantize: str | None = None, qkv_groups: int = 1, mlp_groups: int = 1,
              expert_groups: int | None = None, keep_blocks: bool = True) -> Params:
    """Fuse, cast (and with ``quantize``, quantize) stacked weights into ``Params``.

    From numpy weights this runs on the host, matrix by matrix, so the device never holds the
    float originals; ``load_sharded`` runs it under ``jit`` on arrays already sharded. Without
    ``quantize`` a checkpoint loads as stored: int8 as int8, block matrices as ``BlockArray``
    (fused ones too, when their parts share a format; else dequantized). ``quantize``: an int8
    mode (for an int8 checkpoint it only picks the mode), a block format (matrices stored in it
    are kept, the others quantized into it; experts stay float), or ``"float"`` (everything
    dequantized). ``keep_blocks=False`` dequantizes block matrices (the sharded load).
    ``qkv_groups`` and ``mlp_groups`` (``expert_groups`` for the experts' gate/up; default
    ``mlp_groups``) lay the fused matrices out in per-shard blocks (``sharding.fuse``).
    """
    expert_groups = mlp_groups if expert_groups is None else expert_groups
    check_weights(cfg, weights)
    stored_int8 = is_quantized(weights)
    mode = quantize or ("int8" if stored_int8 else None)
    if mode is not None:
        check_mode(mode)

    def put(x: np.ndarray | jax.Array) -> jax.Array:
        return jnp.asarray(x.astype(np.float32).astype(dtype))

    def matrix(key: str, index: int | None, parts: tuple[str, ...] = (),
               groups: int = 1) -> jax.Array | QuantArray | BlockArray:
        names = parts or (key,)
        axis = QUANTIZED_KEYS[names[0]]
        xp = np if isinstance(weights[names[0]], np.ndarray) else jnp
        formats = {block_format(weights, n) for n in names}
        stored = formats.pop() if len(formats) == 1 else None
        if keep_blocks and stored is not None and mode in (None, stored):
            return blocks.to_device(concat_rows([stored_blocks(weights, n, index) for n in names], groups))

        def part(suffix: str = ""):
            arrays = [weights[n + suffix] if index is None else weights[n + suffix][index] for n in names]
            return fuse(xp, arrays, groups) if parts else arrays[0]

        if stored_int8 and mode in INT8_MODES:
            return QuantArray(q=jnp.asarray(part()), scale=jnp.asarray(part(SCALE)), mode=mode, out_axis=axis)
        floats = [float_matrix(weights, n, index) for n in names]
        w = fuse(xp, floats, groups) if parts else floats[0]
        if mode in INT8_MODES:
            return quantize_matrix(w, out_axis=axis, mode=mode)
        if mode in BLOCK_FORMATS and not names[0].startswith("e_"):
            rows = w.swapaxes(-1, -2) if axis == 1 else w  # [..., O, I]
            if rows.shape[-1] % blocks.BLOCK == 0:
                return blocks.to_device(quantize_blocks(np.asarray(rows), mode))
            log.warning("%s: inner dimension %d is not a multiple of %d; kept as float", key, rows.shape[-1],
                        blocks.BLOCK)
        return put(w)

    def vector(key: str, i: int, parts: tuple[str, ...] = (), groups: int = 1) -> jax.Array | None:
        names = parts or (key,)
        if names[0] not in weights:
            return None
        if not parts:
            return put(weights[key][i])
        xp = np if isinstance(weights[names[0]], np.ndarray) else jnp
        return put(fuse(xp, [weights[n][i] for n in names], groups))

    layers = []
    for i in range(cfg.n_layers):
        moe = cfg.n_experts > 0
        layers.append(LayerParams(
            attn_norm=put(weights["attn_norm"][i]),
            wqkv=matrix("wqkv", i, ("wq", "wk", "wv"), qkv_groups),
            wo=matrix("wo", i),
            mlp_norm=put(weights["mlp_norm"][i]),
            w_gate_up=None if moe else matrix("w_gate_up", i, ("w_gate", "w_up"), mlp_groups),
            w_down=None if moe else matrix("w_down", i),
            bqkv=vector("bqkv", i, ("bq", "bk", "bv"), qkv_groups),
            q_norm=vector("q_norm", i), k_norm=vector("k_norm", i),
            post_attn_norm=vector("post_attn_norm", i), post_mlp_norm=vector("post_mlp_norm", i),
            router=vector("router", i),
            experts_gate_up=matrix("experts_gate_up", i, ("e_gate", "e_up"), expert_groups) if moe else None,
            experts_down=matrix("experts_down", i, ("e_down",)) if moe else None,
        ))
    lm_head = None if cfg.tie_embeddings else matrix("lm_head", None)
    return Params(embed=matrix("embed", None), layers=tuple(layers), final_norm=put(weights["final_norm"]),
                  lm_head=lm_head, qkv_groups=qkv_groups, mlp_groups=mlp_groups, expert_groups=expert_groups)


def _scale_of(name: str) -> tuple[str, int] | None:
    """For ``<matrix>_scale``: the matrix and its output-channel axis; else None."""
    if not name.endswith(SCALE):
        return None
    base = name[: -len(SCALE)]
    return base, QUANTIZED_KEYS[base]


def load_sharded(directory: pathlib.Path, plan: Plan, dtype: jnp.dtype = jnp.float32,
                 quantize: str | None = None) -> tuple[ModelConfig, Params]:
    """Config and params sharded over ``plan``'s mesh, restored straight from orbax.

    Each stored array is restored into its sharding (a device receives only its shard), then
    fused (and quantized, for a float checkpoint with ``quantize``) under ``jit`` shard by
    shard into the layout ``plan`` asks for.
    """
    cfg = load_config(directory)
    if quantize in BLOCK_FORMATS:
        raise ValueError(f"--quantize {quantize}: block formats are served on one device only; a sharded "
                         "model takes --quantize int8, int8-dynamic or float")
    path = directory.resolve() / "params"
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        kept = block_keys(meta)
        if kept:
            # Blocks are not sharded (yet): restored whole on every device (they are small) and
            # dequantized into the float layout, which is sharded as usual.
            log.info("sharded load: block matrices (%s) are dequantized to %s", ", ".join(sorted(set(kept.values()))),
                     jnp.dtype(dtype).name)
        parts = {k + suffix for k in kept for suffix in ("", BLOCK_D, BLOCK_M)}

        def sharding_of(name: str, m) -> jax.sharding.Sharding:
            return plan.replicated() if name in parts else stored_sharding(name, len(m.shape), plan, _scale_of(name))

        target = {name: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding_of(name, m))
                  for name, m in meta.items()}
        stored = ckpt.restore(path, target)
    check_weights(cfg, stored)
    build = functools.partial(to_params, cfg, dtype=dtype, quantize=quantize, qkv_groups=plan.qkv_groups,
                              mlp_groups=plan.mlp_groups, expert_groups=plan.expert_groups, keep_blocks=False)
    shardings = params_sharding(jax.eval_shape(build, stored), plan)
    params = jax.jit(build, out_shardings=shardings)(stored)
    for x in stored.values():
        x.delete()
    return cfg, params


def load(directory: pathlib.Path, dtype: jnp.dtype = jnp.float32, quantize: str | None = None,
         plan: Plan | None = None) -> tuple[ModelConfig, Params, TextTokenizer | None]:
    """Config, device params and tokenizer (``None`` if the checkpoint has none) of a checkpoint.

    Without ``plan`` the params go to the default device; with one, they are sharded over its mesh.
    """
    if plan is not None:
        cfg, params = load_sharded(directory, plan, dtype, quantize)
        return cfg, params, load_tokenizer(directory)
    t0 = time.perf_counter()
    cfg, weights = load_weights(directory)
    keep = blocks.multiplied_in_place()
    if quantize is None and block_keys(weights):
        if keep:
            log.info("block weights multiplied in place: %s", blocks.describe())
        else:
            log.warning("block weights dequantized to %s at load: no CPU kernels here, and XLA:CPU would "
                        "dequantize them in every step (~15x slower than float)", jnp.dtype(dtype).name)
    t1 = time.perf_counter()
    params = to_params(cfg, weights, dtype, quantize, keep_blocks=keep)
    t2 = time.perf_counter()
    tokenizer = load_tokenizer(directory)
    log.info("checkpoint read in %.2f s: weights %.2f s, device params %.2f s, tokenizer %.2f s",
             time.perf_counter() - t0, t1 - t0, t2 - t1, time.perf_counter() - t2)
    return cfg, params, tokenizer
