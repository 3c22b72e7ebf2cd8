"""Grammar libraries for structured output, side by side: llguidance (what jserve uses), xgrammar,
outlines-core, on jserve's default tokenizer (SmolLM2, 49,152 tokens).

For each constraint (JSON schemas small and large, a regex), each library:
- compiles it for the tokenizer (what a request pays when it arrives; caches off or fresh),
- then walks a valid answer token by token (the answer's tokens from the tokenizer), computing the
  allowed-token bitmask before each token and consuming it, as a decode loop does:
  median and worst mask time per token.

    pip install llguidance xgrammar outlines-core transformers torch   # not jserve dependencies
    python scripts/bench_grammars.py [--tokenizer checkpoints/smollm2-135m-instruct/tokenizer.json]

A library that is not installed is skipped. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

SCHEMAS = {
    "small object": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                      "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    "list of 20 strings": ({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"},
                                                                       "minItems": 20}}, "required": ["items"]},
                           {"items": [f"item number {i}" for i in range(20)]}),
    "nested": ({"type": "object", "properties": {
        "title": {"type": "string"}, "year": {"type": "integer"},
        "authors": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}}, "required": ["name", "email"]}},
        "tags": {"type": "array", "items": {"enum": ["science", "history", "art", "travel"]}}},
        "required": ["title", "year", "authors", "tags"]},
        {"title": "A Short History of Bridges", "year": 1999,
         "authors": [{"name": "Jo Smith", "email": "jo@example.com"}, {"name": "Li Wei", "email": "li@example.org"}],
         "tags": ["history", "travel"]}),
}
REGEX = (r"[0-9]{3}-[0-9]{3}-[0-9]{4}( ext\. [0-9]{1,5})?", "555-123-4567 ext. 89")


def answer_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def timed_walk(ids: list[int], mask, consume) -> list[float]:
    times = []
    for t in ids:
        t0 = time.perf_counter()
        mask()
        times.append(time.perf_counter() - t0)
        consume(t)
    return times


def run_llguidance(tok_json: str, vocab: int, eos: int, cases):
    import llguidance
    import numpy as np

    lt = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    out = {}
    for name, (kind, spec, ids) in cases.items():
        t0 = time.perf_counter()
        if kind == "json":
            g = llguidance.LLMatcher.grammar_from_json_schema(spec, overrides={"whitespace_flexible": False})
        else:
            g = llguidance.LLMatcher.grammar_from_regex(spec)
        m = llguidance.LLMatcher(lt, g, log_level=0)
        compile_s = time.perf_counter() - t0
        buf = np.zeros(((vocab + 31) // 32,), np.int32)
        times = timed_walk(ids, lambda m=m, buf=buf: m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes),
                           m.consume_token)
        assert not m.is_error(), m.get_error()
        out[name] = (compile_s, times)
    return out


def run_xgrammar(tok_file: str, vocab: int, cases):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=tok_file), vocab_size=vocab)
    out = {}
    for name, (kind, spec, ids) in cases.items():
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        if kind == "json":
            cg = compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
        else:
            cg = compiler.compile_regex(spec)
        m = xgr.GrammarMatcher(cg)
        compile_s = time.perf_counter() - t0
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        ok = []
        times = timed_walk(ids, lambda m=m, b=bitmask: m.fill_next_token_bitmask(b),
                           lambda t, m=m, ok=ok: ok.append(m.accept_token(t)))
        assert all(ok), f"xgrammar refused a token of the {name} answer"
        out[name] = (compile_s, times)
    return out


def run_outlines(tok_json: str, vocab: int, eos: int, cases):
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = _byte_decoder()
    model = json.loads(tok_json)["model"]["vocab"]
    special = {t["content"] for t in json.loads(tok_json).get("added_tokens", [])}
    table: dict[bytes, list[int]] = {}
    for token, i in model.items():
        if i == eos or token in special:
            continue
        table.setdefault(bytes(byte_of[c] for c in token), []).append(i)
    voc = Vocabulary(eos, table)
    out = {}
    for name, (kind, spec, ids) in cases.items():
        t0 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(spec)) if kind == "json" else spec
        index = Index(regex, voc)
        guide = Guide(index)
        compile_s = time.perf_counter() - t0
        buf = np.zeros(((vocab + 31) // 32,), np.int32)
        times = timed_walk(ids, lambda g=guide, buf=buf: g.write_mask_into(buf.ctypes.data, buf.size, buf.itemsize),
                           guide.advance)
        out[name] = (compile_s, times)
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=pathlib.Path,
                    default=pathlib.Path("checkpoints/smollm2-135m-instruct/tokenizer.json"))
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--eos", type=int, default=2)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    tok_json = args.tokenizer.read_text()
    tok = Tokenizer.from_str(tok_json)
    cases = {name: ("json", schema, answer_ids(tok, json.dumps(answer, separators=(",", ":"))))
             for name, (schema, answer) in SCHEMAS.items()}
    cases["regex (phone)"] = ("regex", REGEX[0], answer_ids(tok, REGEX[1]))
    runners = {"llguidance": lambda: run_llguidance(tok_json, args.vocab, args.eos, cases),
               "xgrammar": lambda: run_xgrammar(str(args.tokenizer), args.vocab, cases),
               "outlines-core": lambda: run_outlines(tok_json, args.vocab, args.eos, cases)}
    results = {}
    for lib, run in runners.items():
        try:
            results[lib] = run()
        except ImportError as e:
            print(f"{lib}: not installed ({e})", file=sys.stderr)
        except Exception as e:  # a library that cannot do a case is reported, not fatal
            print(f"{lib}: failed: {type(e).__name__}: {e}", file=sys.stderr)
    print("| constraint | library | compile (ms) | mask per token, median (µs) | worst (µs) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in cases:
        for lib, res in results.items():
            compile_s, times = res[name]
            print(f"| {name} ({len(cases[name][2])} tokens) | {lib} | {compile_s * 1e3:.1f} | "
                  f"{statistics.median(times) * 1e6:.0f} | {max(times) * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
