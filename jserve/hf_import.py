"""Hugging Face checkpoints (``config.json`` + ``*.safetensors``) into jserve checkpoints.

The family comes from ``model_type`` (``HF_FAMILIES``); every difference from Llama is read from
that config into ``ModelConfig`` fields, and each family's tensor names are mapped onto the
stored layout of ``checkpoint.py``. Used through ``python -m jserve.convert hf``
(``jserve/convert.py``).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

import numpy as np
from tqdm import tqdm

from jserve import chat_template, checkpoint
from jserve.config import ModelConfig, RopeScaling
from jserve.tokenizer import TextTokenizer, TokenizerConfig

log = logging.getLogger("jserve.convert")


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
        chat_template=chat_template.load_templates(directory), add_bos_token=bool(tc.get("add_bos_token", False)),
        special_ids=special, special_tokens=chat_template.special_tokens(tc) or None,
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
