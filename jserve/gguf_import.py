"""GGUF files into jserve checkpoints: llama.cpp's layouts undone, its metadata read as a ``ModelConfig``.

Architectures: ``llama`` (Llama, Mistral, and Mixtral with experts), ``qwen2``, ``qwen3``,
``qwen3moe``, ``gemma2``, ``gemma3``, ``phi3``. Matrices in Q8_0, Q4_0, Q4_1 or the K-quants Q4_K,
Q5_K, Q6_K (what Q4_K_M / Q5_K_M / Q6_K files hold) are kept as their blocks (``jserve/blocks.py``),
byte for byte, llama.cpp's row layouts undone on whole block rows (a row is whole blocks: GGUF's
rows are a multiple of the block's values; a matrix where that fails is dequantized, logged); other
quantized types are dequantized to float32, as are experts' matrices and a matrix whose layers (or
fused parts) do not share one block format (a Q4_K_M file mixes Q4_K and Q6_K across a matrix's layers). Used through
``python -m jserve.convert gguf`` (``jserve/convert.py``).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np
from tqdm import tqdm

from jserve import checkpoint
from jserve.blocks import GGUF_TYPES, BlockArray, block_values, dequantize_blocks, from_gguf_bytes
from jserve.config import ModelConfig, RopeScaling
from jserve.tokenizer import TextTokenizer, tokenizer_from_gguf

log = logging.getLogger("jserve.convert")


def unpermute_rope_rows(w: np.ndarray | BlockArray, n_heads: int) -> np.ndarray | BlockArray:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) for ``w [out, in]`` (or its blocks:
    the permutation moves whole rows, so it moves block rows alike).

    llama.cpp stores each head's rows as pairs (x0, x_{H/2}), (x1, x_{H/2+1}), ...; HF Llama
    and jserve rotate the two halves of a head, so the rows go back to half-split order.
    """
    if isinstance(w, BlockArray):
        return w.map_rows(lambda a: unpermute_rope_rows(a, n_heads))
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_fields(reader: Any) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


# GGUF ``general.architecture`` → the family (HF ``model_type``) jserve gives it. llama.cpp writes
# Mistral and Mixtral as "llama" (Mixtral with experts).
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gemma2": "gemma2",
              "gemma3": "gemma3_text", "phi3": "phi3"}
# llama.cpp's graphs treat these layer counts as the 27B models, whose queries are scaled by
# 1/sqrt(dim / heads) instead of 1/sqrt(head_dim) (GGUF has no query_pre_attn_scalar).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def config_from_gguf(fields: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    if tensor_names & {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}:
        raise ValueError("this GGUF carries precomputed RoPE frequency factors (Llama 3.1 or LongRoPE); "
                         "convert the model from its Hugging Face checkpoint instead (jserve.convert hf)")

    def get(key: str, default: Any = None) -> Any:
        v = fields.get(f"{arch}.{key}", default)
        # GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07; take the shortest
        # decimal that float32 value stands for, which is what the model's config said.
        return float(str(np.float32(v))) if isinstance(v, float) else v

    dim, n_heads, n_layers = int(get("embedding_length")), int(get("attention.head_count")), int(get("block_count"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count < head dim) are not supported")
    vocab = int(get("vocab_size", len(fields["tokenizer.ggml.tokens"])))
    eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in fields]
    n_experts = int(get("expert_count", 0))
    family = "mixtral" if arch == "llama" and n_experts else GGUF_ARCHS[arch]
    scaling = None
    kind = get("rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling(factor=float(get("rope.scaling.factor")), kind="linear")
    elif kind not in (None, "none"):
        raise ValueError(f"unsupported GGUF RoPE scaling type {kind!r} (supported: none, linear)")
    gemma = arch in _GEMMA_27B_LAYERS
    window = int(get("attention.sliding_window", 0)) or None
    sliding: tuple[bool, ...] = ()
    if arch == "qwen2" or arch == "qwen3" or arch == "qwen3moe":
        window = None  # llama.cpp runs these without a window
    elif gemma and window is not None:  # llama.cpp's default patterns: every 2nd / 6th layer is global
        pattern = int(get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6))
        sliding = tuple(i % pattern < pattern - 1 for i in range(n_layers))
    attn_scale = None
    if gemma:
        per_head = dim / n_heads if n_layers == _GEMMA_27B_LAYERS[arch] else head_dim
        given = get("attention.scale")
        attn_scale = float(given) if given is not None else per_head ** -0.5
    moe = dict(n_experts=n_experts, experts_per_token=int(get("expert_used_count"))) if n_experts else {}
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn_dim=int(get("expert_feed_forward_length", 0) or get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos)),
        arch=family, qkv_bias="blk.0.attn_q.bias" in tensor_names, qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        post_norms=gemma, activation="gelu_tanh" if gemma else "silu",
        embed_scale=float(np.sqrt(dim)) if gemma else None, attn_scale=attn_scale,
        attn_softcap=get("attn_logit_softcapping") if gemma else None,
        final_softcap=get("final_logit_softcapping") if gemma else None,
        sliding_window=window, sliding_layers=sliding,
        rope_local_theta=float(get("rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None, **moe,
    )


def _float(w: np.ndarray | BlockArray) -> np.ndarray:
    return dequantize_blocks(w, np.float32) if isinstance(w, BlockArray) else w


def _rows(w: np.ndarray | BlockArray, start: int, stop: int | None = None) -> np.ndarray | BlockArray:
    if isinstance(w, BlockArray):
        return w.map_rows(lambda a: a[start:stop])
    return w[start:stop]


def _store(key: str, ws: list[np.ndarray | BlockArray], out: dict[str, np.ndarray], layers: bool = True) -> None:
    """Store a matrix (GGUF order, ``[..., out, in]``; one per layer with ``layers``) as blocks
    when its parts share one block format, else as float in the stored layout (``[..., in, out]``,
    ``embed`` ``[V, D]``)."""
    def stack(arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays) if layers else arrays[0]

    formats = {w.fmt if isinstance(w, BlockArray) else None for w in ws}
    if len(formats) == 1 and None not in formats and not key.startswith("e_"):
        m = None if ws[0].m is None else stack([w.m for w in ws])
        b = BlockArray(qs=stack([w.qs for w in ws]), d=stack([w.d for w in ws]), m=m, fmt=ws[0].fmt)
        checkpoint.put_blocks(out, key, b)
        return
    if len(formats) > 1:
        log.info("%s: layers in formats %s are dequantized to float32", key, sorted(map(str, formats)))
    x = stack([_float(w) for w in ws])
    out[key] = x.swapaxes(-1, -2) if checkpoint.QUANTIZED_KEYS[key] == 1 else x


def gguf_weights(cfg: ModelConfig, arch: str, get: Any) -> dict[str, np.ndarray]:
    """jserve's stored weights from a GGUF's tensors (``get(name)`` → float32 in numpy order,
    ``[out, in]`` for matrices, ``[experts, out, in]`` for stacked experts, or a matrix's blocks
    as a ``BlockArray`` ``[out, in]``). Undoes llama.cpp's layout: Q/K rows interleaved for RoPE
    ("llama" only), Phi-3's fused Q/K/V and gate/up (on rows, so blocks split alike); Gemma's
    norms are already stored as 1 + w."""
    per_layer: dict[str, list[np.ndarray]] = {}

    def add(key: str, w: np.ndarray | BlockArray) -> None:
        per_layer.setdefault(key, []).append(w)

    nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in tqdm(range(cfg.n_layers), desc="reading GGUF layers", unit="layer"):
        def t(name: str, i: int = i) -> np.ndarray | BlockArray:
            return get(f"blk.{i}.{name}")

        def v(name: str, i: int = i) -> np.ndarray:
            return _float(get(f"blk.{i}.{name}"))

        add("attn_norm", v("attn_norm.weight"))
        if cfg.arch == "phi3":
            qkv = t("attn_qkv.weight")
            add("wq", _rows(qkv, 0, nq)), add("wk", _rows(qkv, nq, nq + nk)), add("wv", _rows(qkv, nq + nk))
        else:
            wq, wk = t("attn_q.weight"), t("attn_k.weight")
            if arch == "llama":
                wq, wk = unpermute_rope_rows(wq, cfg.n_heads), unpermute_rope_rows(wk, cfg.n_kv_heads)
            add("wq", wq), add("wk", wk), add("wv", t("attn_v.weight"))
        add("wo", t("attn_output.weight"))
        if cfg.qkv_bias:
            add("bq", v("attn_q.bias")), add("bk", v("attn_k.bias")), add("bv", v("attn_v.bias"))
        if cfg.qk_norm:
            add("q_norm", v("attn_q_norm.weight")), add("k_norm", v("attn_k_norm.weight"))
        add("mlp_norm", v("ffn_norm.weight"))
        if cfg.post_norms:
            add("post_attn_norm", v("post_attention_norm.weight")), add("post_mlp_norm", v("post_ffw_norm.weight"))
        if cfg.n_experts:
            add("router", v("ffn_gate_inp.weight").T)
            for key, name in (("e_gate", "ffn_gate_exps"), ("e_up", "ffn_up_exps"), ("e_down", "ffn_down_exps")):
                add(key, v(f"{name}.weight"))
        elif cfg.arch == "phi3":
            gate_up = t("ffn_up.weight")
            add("w_gate", _rows(gate_up, 0, cfg.ffn_dim)), add("w_up", _rows(gate_up, cfg.ffn_dim))
            add("w_down", t("ffn_down.weight"))
        else:
            add("w_gate", t("ffn_gate.weight")), add("w_up", t("ffn_up.weight"))
            add("w_down", t("ffn_down.weight"))
    weights: dict[str, np.ndarray] = {}
    for key, ws in per_layer.items():
        if key in checkpoint.QUANTIZED_KEYS:
            _store(key, ws, weights)
        else:
            weights[key] = np.stack(ws)
    _store("embed", [get("token_embd.weight")], weights, layers=False)
    weights["final_norm"] = _float(get("output_norm.weight"))
    if not cfg.tie_embeddings:
        _store("lm_head", [get("output.weight")], weights, layers=False)
    return weights


def convert_gguf(path: pathlib.Path, out: pathlib.Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = _gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(fields, set(tensors))
    log.info("GGUF %s: %s", path.name, cfg)
    if cfg.attn_scale is not None and f"{fields['general.architecture']}.attention.scale" not in fields:
        log.warning("this GGUF does not record Gemma's query_pre_attn_scalar: queries are scaled by %.6g as "
                    "llama.cpp does; if the model's config.json says otherwise, convert from its Hugging Face "
                    "checkpoint (jserve.convert hf)", cfg.attn_scale)

    def get(name: str) -> np.ndarray | BlockArray:
        t = tensors[name]
        fmt = GGUF_TYPES.get(t.tensor_type.name)
        if fmt is not None and len(t.shape) == 2 and int(t.shape[0]) % block_values(fmt):
            log.info("%s: %s rows of %d values are not whole blocks of %d; dequantized to float32", name,
                     t.tensor_type.name, int(t.shape[0]), block_values(fmt))
        elif fmt is not None and len(t.shape) == 2:
            return from_gguf_bytes(np.asarray(t.data), fmt)  # [out, in / B values, bytes]: rows as the file has them
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))

    weights = gguf_weights(cfg, fields["general.architecture"], get)
    try:
        tok, tok_cfg = tokenizer_from_gguf(fields)
        tokenizer = TextTokenizer(tok, tok_cfg)
    except ValueError as e:
        log.warning("%s: the checkpoint will accept token ids only (convert the Hugging Face checkpoint, "
                    "with its tokenizer.json, for text and chat)", e)
        tokenizer = None
    checkpoint.save(out, cfg, weights, tokenizer)
