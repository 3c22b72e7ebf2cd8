"""Convert the tiny family checkpoints to GGUF with llama.cpp's own converter.

Writes ``tests/data/tiny_hf/<family>/model.gguf`` for qwen2, qwen3, gemma2, gemma3, phi3,
mixtral and qwen3_moe (the checkpoints ``scripts/make_families.py`` writes; mistral is left
out, its layout is plain llama). The files are made by llama.cpp's ``convert_hf_to_gguf.py``,
not by jserve, so that jserve's GGUF importer is tested against files it did not write.

llama.cpp source: the tree vendored in the llama-cpp-python 0.3.36 sdist on PyPI::

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz -C /tmp/llama
    # -> /tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp

The converter runs in this process with its bundled ``gguf-py`` (put first on ``sys.path``;
an installed ``gguf`` package is not used) and needs ``torch``, ``transformers``, ``numpy``
and ``safetensors`` (written with torch 2.13 CPU, transformers 5.24). No llama.cpp file is
modified. Two things are done around the converter, in this process only:

- The checkpoints ship no tokenizer, and every converter class reads one in ``set_vocab``.
  ``set_vocab`` of each family's converter class is replaced (monkeypatched on the class)
  by one that writes a placeholder vocabulary of ``vocab_size`` (256) tokens: tokenizer
  model ``llama`` (SentencePiece-style: needs no merges and no pre-tokenizer), tokens
  ``<t0>`` .. ``<t255>``, scores 0.0, token types NORMAL (1), and
  ``tokenizer.ggml.bos_token_id`` / ``eos_token_id`` from config.json (1, 2).
- The converter reads the input from a temporary copy of the checkpoint directory
  (config.json, generation_config.json, model.safetensors). For gemma3 that copy also holds
  a placeholder ``tokenizer.json`` listing the same 256 tokens, because llama.cpp's Gemma 3
  class trims ``token_embd`` to the tokenizer's size (read from tokenizer.json) outside
  ``set_vocab``; with 256 tokens the trim keeps every row.

Then it drives ``convert_hf_to_gguf.main()`` exactly as its command line does, with
``--outtype f32`` (weights bit-exact) and ``--model-name tiny-<family>`` (``general.name``).

After writing, every file is read back with ``gguf.GGUFReader`` and each tensor is compared
with the HF tensor it comes from, after the transforms llama.cpp's converter documents
(numpy, max abs difference must be 0; every HF tensor must be used):

- all: HF ``[out, in]`` Linear weight -> GGUF tensor with ne ``[in, out]`` (the same bytes;
  ``GGUFReader`` gives numpy shape ``[out, in]``). Names: ``token_embd``, ``output_norm``,
  ``output`` (absent when the embeddings are tied), ``blk.N.attn_norm``, ``attn_q``,
  ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_gate``, ``ffn_up``, ``ffn_down``,
  ``ffn_norm``.
- gemma2/gemma3: every ``*norm.weight`` (input/post-attention/pre- and post-feedforward
  norms, q/k norms, final norm) is stored as ``w + 1``; HF ``post_attention_layernorm`` ->
  ``post_attention_norm``, ``pre_feedforward_layernorm`` -> ``ffn_norm``,
  ``post_feedforward_layernorm`` -> ``post_ffw_norm``; ``lm_head`` is dropped.
- mixtral (llama arch, interleaved RoPE): q_proj/k_proj rows are permuted per head from
  HF's half-split order to interleaved pairs; experts stacked into one 3-D tensor per
  projection (numpy ``[expert, out, in]``): w1 -> ffn_gate_exps, w3 -> ffn_up_exps,
  w2 -> ffn_down_exps; router ``block_sparse_moe.gate`` -> ``ffn_gate_inp``.
- qwen3_moe: experts stacked the same way (gate_proj/up_proj/down_proj -> ffn_*_exps),
  router ``mlp.gate`` -> ``ffn_gate_inp``; no permutation (NEOX RoPE).
- phi3: fused ``qkv_proj`` -> ``attn_qkv`` and fused ``gate_up_proj`` -> ``ffn_up``, kept
  fused, unchanged.

Usage::

    /tmp/hfenv/bin/python scripts/make_family_ggufs.py            # all seven families
    /tmp/hfenv/bin/python scripts/make_family_ggufs.py --only gemma3 --dump
    /tmp/hfenv/bin/python scripts/make_family_ggufs.py --check-only --dump

``--llama-cpp DIR`` (or ``$LLAMA_CPP_DIR``) points at the llama.cpp tree; ``--dump`` prints
each file's metadata and its non-block and block-0 tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "tiny_hf"
DEFAULT_LLAMA_CPP = "/tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp"
FAMILIES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe")
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors")
OUT_NAME = "model.gguf"


def import_converter(llama_dir: pathlib.Path):
    """Import llama.cpp's convert_hf_to_gguf (and its conversion package and gguf-py)."""
    if not (llama_dir / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"no convert_hf_to_gguf.py in {llama_dir} (see the docstring)")
    if "NO_LOCAL_GGUF" in os.environ:
        raise SystemExit("unset NO_LOCAL_GGUF: the converter must use llama.cpp's own gguf-py")
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    sys.path.insert(0, str(llama_dir))
    import convert_hf_to_gguf  # noqa: E402  (imports torch, gguf, conversion)
    import gguf

    gguf_dir = pathlib.Path(gguf.__file__).resolve().parent
    if gguf_dir != (llama_dir / "gguf-py" / "gguf").resolve():
        raise SystemExit(f"imported gguf from {gguf_dir}, not llama.cpp's bundled gguf-py")
    return convert_hf_to_gguf


def placeholder_set_vocab(self) -> None:
    """Replacement for ``TextModel.set_vocab``: a vocabulary of ``vocab_size`` dummy tokens."""
    import gguf

    config = json.loads((self.dir_model / "config.json").read_text())
    n = int(config["vocab_size"])
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * n)
    w.add_bos_token_id(int(config["bos_token_id"]))
    w.add_eos_token_id(int(config["eos_token_id"]))


def convert(conv, family: str, out_path: pathlib.Path, verbose: bool) -> None:
    src = FIXTURES / family
    config = json.loads((src / "config.json").read_text())
    model_class = conv.get_model_class(config["architectures"][0])
    model_class.set_vocab = placeholder_set_vocab
    with tempfile.TemporaryDirectory(prefix="gguf-") as tmp:
        stage = pathlib.Path(tmp) / family
        stage.mkdir()
        for name in CHECKPOINT_FILES:
            shutil.copyfile(src / name, stage / name)
        if family == "gemma3":
            vocab = {f"<t{i}>": i for i in range(int(config["vocab_size"]))}
            tok = {"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": []}
            (stage / "tokenizer.json").write_text(json.dumps(tok))
        tmp_out = pathlib.Path(tmp) / OUT_NAME
        argv = [
            "convert_hf_to_gguf.py", str(stage), "--outfile", str(tmp_out),
            "--outtype", "f32", "--model-name", f"tiny-{family}",
        ]
        if verbose:
            argv.append("--verbose")
        saved = sys.argv
        sys.argv = argv
        try:
            conv.main()
        finally:
            sys.argv = saved
        shutil.copyfile(tmp_out, out_path)


# ---------------------------------------------------------------------------------------
# read-back check: every GGUF tensor == the llama.cpp transform of its HF tensor(s)


def permute_rope_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head.

    GGUF row h*hd + 2*i + s == HF row h*hd + s*hd/2 + i  (i < hd/2, s in {0, 1}).
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(family: str, hf: dict[str, np.ndarray], config: dict) -> dict:
    """GGUF name -> (expected array, list of HF names it came from)."""
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    gemma = family in ("gemma2", "gemma3")

    def put(gname, hname, f=lambda x: x):
        out[gname] = (f(hf[hname]), [hname])

    def norm(x):
        return x + np.float32(1) if gemma else x

    put("token_embd.weight", "model.embed_tokens.weight")
    put("output_norm.weight", "model.norm.weight", norm)
    if "lm_head.weight" in hf and not gemma:
        put("output.weight", "lm_head.weight")
    n_head = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    for b in range(config["num_hidden_layers"]):
        p = f"model.layers.{b}."
        g = f"blk.{b}."
        put(g + "attn_norm.weight", p + "input_layernorm.weight", norm)
        if family == "phi3":
            put(g + "attn_qkv.weight", p + "self_attn.qkv_proj.weight")
            put(g + "ffn_up.weight", p + "mlp.gate_up_proj.weight")
            put(g + "ffn_down.weight", p + "mlp.down_proj.weight")
        else:
            q = k = lambda x: x
            if family == "mixtral":
                q = lambda x: permute_rope_interleaved(x, n_head)  # noqa: E731
                k = lambda x: permute_rope_interleaved(x, n_kv)  # noqa: E731
            put(g + "attn_q.weight", p + "self_attn.q_proj.weight", q)
            put(g + "attn_k.weight", p + "self_attn.k_proj.weight", k)
            put(g + "attn_v.weight", p + "self_attn.v_proj.weight")
        put(g + "attn_output.weight", p + "self_attn.o_proj.weight")
        for kind in ("q", "k", "v"):
            if p + f"self_attn.{kind}_proj.bias" in hf:
                put(g + f"attn_{kind}.bias", p + f"self_attn.{kind}_proj.bias")
        if p + "self_attn.q_norm.weight" in hf:
            put(g + "attn_q_norm.weight", p + "self_attn.q_norm.weight", norm)
            put(g + "attn_k_norm.weight", p + "self_attn.k_norm.weight", norm)
        if gemma:
            put(g + "post_attention_norm.weight", p + "post_attention_layernorm.weight", norm)
            put(g + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", norm)
            put(g + "post_ffw_norm.weight", p + "post_feedforward_layernorm.weight", norm)
        else:
            put(g + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        if family in ("mixtral", "qwen3_moe"):
            n_exp = config["num_local_experts"]
            if family == "mixtral":
                moe = p + "block_sparse_moe."
                projs = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
            else:
                moe = p + "mlp."
                projs = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                         "ffn_down_exps": "down_proj"}
            put(g + "ffn_gate_inp.weight", moe + "gate.weight")
            for gname, hname in projs.items():
                names = [f"{moe}experts.{e}.{hname}.weight" for e in range(n_exp)]
                out[g + gname + ".weight"] = (np.stack([hf[n] for n in names], axis=0), names)
        elif family != "phi3":
            put(g + "ffn_gate.weight", p + "mlp.gate_proj.weight")
            put(g + "ffn_up.weight", p + "mlp.up_proj.weight")
            put(g + "ffn_down.weight", p + "mlp.down_proj.weight")
    return out


def check(family: str, path: pathlib.Path) -> float:
    """Compare the GGUF with the HF checkpoint; return the max abs difference (must be 0)."""
    import gguf
    from safetensors.numpy import load_file

    src = FIXTURES / family
    config = json.loads((src / "config.json").read_text())
    hf = load_file(src / "model.safetensors")
    expected = expected_tensors(family, hf, config)
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(expected):
        raise AssertionError(
            f"{family}: tensor names differ: only in GGUF {sorted(set(got) - set(expected))}, "
            f"only expected {sorted(set(expected) - set(got))}")
    used = {h for _, names in expected.values() for h in names}
    unused = set(hf) - used
    if unused - ({"lm_head.weight"} if family.startswith("gemma") else set()):
        raise AssertionError(f"{family}: HF tensors not in the GGUF: {sorted(unused)}")
    worst = 0.0
    for name, (want, _) in expected.items():
        t = got[name]
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise AssertionError(f"{family}: {name} is {t.tensor_type.name}, not F32")
        # ne (GGUF order) is the numpy shape reversed
        if tuple(int(d) for d in t.shape) != tuple(reversed(want.shape)):
            raise AssertionError(f"{family}: {name} ne {list(t.shape)} vs HF {want.shape}")
        data = np.asarray(t.data).reshape(want.shape)
        diff = float(np.max(np.abs(data - want))) if want.size else 0.0
        worst = max(worst, diff)
        if diff != 0.0:
            raise AssertionError(f"{family}: {name} differs by {diff}")
    return worst


def field_value(field):
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        n = len(field.data)
        head = field.contents(slice(0, 4))
        return f"[{n} items] {head}{' ...' if n > 4 else ''}"
    return field.contents()


def dump(family: str, path: pathlib.Path) -> None:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    print(f"== {family}: {path.relative_to(REPO)} ({path.stat().st_size} bytes), "
          f"general.architecture = {arch!r}")
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        print(f"   {name} = {field_value(field)!r}")
    for t in reader.tensors:
        if t.name.startswith("blk.") and not t.name.startswith("blk.0."):
            continue
        print(f"   {t.name:32s} ne={[int(d) for d in t.shape]} {t.tensor_type.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR", DEFAULT_LLAMA_CPP),
                    help="llama.cpp source tree (default: $LLAMA_CPP_DIR or %(default)s)")
    ap.add_argument("--only", nargs="+", choices=FAMILIES, help="families to write")
    ap.add_argument("--check-only", action="store_true", help="only check existing files")
    ap.add_argument("--dump", action="store_true", help="print metadata and tensors")
    ap.add_argument("-v", "--verbose", action="store_true", help="the converter's INFO log")
    args = ap.parse_args()
    # the converter's main() calls logging.basicConfig(INFO), a no-op once this has run
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    llama_dir = pathlib.Path(args.llama_cpp).resolve()
    conv = import_converter(llama_dir)
    families = args.only or FAMILIES
    total = 0
    for family in families:
        out = FIXTURES / family / OUT_NAME
        if not args.check_only:
            convert(conv, family, out, args.verbose)
        worst = check(family, out)
        size = out.stat().st_size
        total += size
        print(f"{family}: {out.relative_to(REPO)} {size} bytes, "
              f"all tensors match HF after llama.cpp's transforms (max abs diff {worst})")
        if args.dump:
            dump(family, out)
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
