"""int8 quantization: error bounds, memory, perplexity and greedy agreement on the real model."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from jserve import SamplingParams, checkpoint, convert
from jserve.quality import perplexity
from jserve.quant import QuantArray, dense, dequantize, quantize, quantize_np, weight_bytes

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("out_axis", [0, 1])
def test_quantization_error_per_channel_is_at_most_half_a_step(out_axis):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 80)).astype(np.float32) * rng.uniform(0.01, 10, size=(1, 80) if out_axis else (96, 1))
    w[:, 3 if out_axis else 0] = 0.0  # an all-zero channel must not divide by zero
    if not out_axis:
        w[3] = 0.0
    q, scale = quantize_np(w, out_axis)
    assert q.dtype == np.int8 and scale.shape == (w.shape[out_axis],)
    s = scale[None, :] if out_axis else scale[:, None]
    err = np.abs(w - q.astype(np.float32) * s)
    assert np.all(err <= s / 2 * (1 + 1e-6))
    assert np.abs(q).max() == 127  # the full range is used
    np.testing.assert_allclose(np.asarray(dequantize(quantize(w, out_axis))), q * s)


@pytest.mark.parametrize("mode, tol", [("int8", 1e-5), ("int8-dynamic", 2e-2)])
def test_dense_matches_float_product_of_the_dequantized_weight(mode, tol):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 48)).astype(np.float32)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    qa = quantize(w, 1, mode)
    ref = x @ np.asarray(dequantize(qa))
    got = np.asarray(dense(jnp.asarray(x), qa))
    assert np.max(np.abs(got - ref)) <= tol * np.max(np.abs(ref))
    # transposed use, as the tied output projection reads the embedding
    e = quantize(w.T.copy(), 0, mode)
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x), e, transpose=True)), got, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def real_weights(real_ckpt):
    return checkpoint.load_weights(real_ckpt)


def test_int8_weight_bytes_are_at_most_30_percent_of_f32(real_weights):
    cfg, w = real_weights
    f32 = weight_bytes(checkpoint.to_params(cfg, w, jnp.float32, "float"))  # the GGUF's blocks dequantized
    int8 = checkpoint.to_params(cfg, w, jnp.float32, "int8")
    assert isinstance(int8.layers[0].wqkv, QuantArray) and isinstance(int8.embed, QuantArray)
    assert int8.layers[0].wqkv.q.dtype == jnp.int8
    assert weight_bytes(int8) <= 0.30 * f32  # scales and norms included


def test_int8_perplexity_within_2_percent_of_f32(real_ckpt, real_weights):
    cfg, w = real_weights
    ids = checkpoint.load_tokenizer(real_ckpt).encode((DATA / "public_domain_english.txt").read_text())
    assert len(ids) > 2000
    ppl = {m: perplexity(checkpoint.to_params(cfg, w, jnp.float32, m), cfg, ids) for m in ("float", "int8")}
    assert ppl["int8"] <= 1.02 * ppl["float"], ppl
    assert 5 < ppl["float"] < 60, ppl  # a sane English perplexity for this model, not a broken one


def test_int8_greedy_matches_f32_on_most_fixture_prompts(real_ckpt, reference):
    from jserve import LLM

    cases = reference["cases"]
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    with LLM(real_ckpt, slots=4, max_len=128, max_prompt_len=64, quantize="int8") as llm:
        got = llm.generate([c["prompt_ids"] for c in cases], sp)
    same = [r.token_ids == c["greedy_ids"] for r, c in zip(got, cases)]
    assert sum(same) >= 5, [c["id"] for c, s in zip(cases, same) if not s]
    first = [r.token_ids[0] == c["greedy_ids"][0] for r, c in zip(got, cases)]
    assert all(first)


def test_quantized_checkpoint_round_trip(tiny_ckpt, tmp_path):
    out = tmp_path / "tiny-int8"
    convert.main(["quantize", str(tiny_ckpt), "--out", str(out)])
    cfg, stored = checkpoint.load_weights(out)
    assert checkpoint.is_quantized(stored) and stored["wq"].dtype == np.int8
    assert (out / "tokenizer.json").is_file()
    _, from_disk, _ = checkpoint.load(out)
    _, at_load, _ = checkpoint.load(tiny_ckpt, quantize="int8")
    for a, b in ((from_disk.layers[1].wqkv, at_load.layers[1].wqkv), (from_disk.embed, at_load.embed)):
        np.testing.assert_array_equal(np.asarray(a.q), np.asarray(b.q))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert weight_bytes(from_disk) == weight_bytes(at_load)
