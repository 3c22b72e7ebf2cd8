"""Quality of each weight mode on the real model: memory, perplexity, greedy agreement.

For float32, bfloat16, int8 (weight-only) and int8-dynamic (weights and activations):
- device bytes of the weights (scales included);
- perplexity on tests/data/public_domain_english.txt (non-overlapping 512-token windows);
- greedy agreement over the HF reference fixture prompts (32 tokens each): prompts whose
  tokens equal float32's, the mean fraction of matching tokens before the first divergence,
  and where each diverging prompt first differs; also agreement with HF's own tokens.

And for each KV cache type (``--kv-dtype``: float32, bfloat16, float16, int8 with a scale per
vector) on the stored weights: KV bytes per token (all layers, keys and values, scales included),
perplexity with every key and value read back from a cache of that type
(``quality.perplexity_cached``: the same windows, run in 64-position chunks as serving runs
prompts) and greedy agreement with the float32 cache, ``--kv-tokens`` tokens for ``--kv-prompts``
prompts (the fixture's, then pieces of the text), and with HF's 32 tokens on the fixture's.

    python scripts/eval_quality.py [--checkpoint DIR] [--json out.json] [--only weights|kv]
                                   [--kv-dtypes int8,float32] [--kv-prompts 20] [--kv-tokens 64]

Prints a markdown table and writes the full result as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (name, dtype, --quantize): float32/bfloat16 dequantize a block checkpoint; "stored" serves it as it is
# (the default GGUF's own Q4_1/Q8_0 blocks).
MODES = [("float32", "float32", "float"), ("bfloat16", "bfloat16", "float"), ("stored", "float32", None),
         ("int8", "float32", "int8"), ("int8-dynamic", "float32", "int8-dynamic"), ("q8_0", "float32", "q8_0"),
         ("q4_0", "float32", "q4_0"), ("q4_1", "float32", "q4_1")]


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None)
    ap.add_argument("--reference", type=pathlib.Path, default=ROOT / "tests/data/reference_smollm2.json")
    ap.add_argument("--text", type=pathlib.Path, default=ROOT / "tests/data/public_domain_english.txt")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
    ap.add_argument("--only", choices=("weights", "kv"), default=None, help="one of the two tables")
    ap.add_argument("--kv-dtypes", default=None,
                    help="comma-separated KV cache types for the kv table (default: all; float32 is always run)")
    ap.add_argument("--kv-prompts", type=int, default=None,
                    help="greedy prompts for the kv table: the fixture's, then 48-token pieces of --text")
    ap.add_argument("--kv-tokens", type=int, default=None, help="greedy tokens per prompt for the kv table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax.numpy as jnp

    from jserve import LLM, SamplingParams, checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.quality import perplexity
    from jserve.quant import weight_bytes

    ckpt = args.checkpoint or ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    cases = json.loads(args.reference.read_text())["cases"]
    cfg, weights = checkpoint.load_weights(ckpt)
    ids = checkpoint.load_tokenizer(ckpt).encode(args.text.read_text())
    sp = SamplingParams(temperature=0.0, max_tokens=len(cases[0]["greedy_ids"]), ignore_eos=True)

    results, greedy = [], {}
    if args.only != "weights":
        kv = kv_table(ckpt, cfg, weights, ids, cases, sp, args)
        if args.only == "kv":
            if args.json:
                args.json.write_text(json.dumps(kv, indent=1))
            return 0
    for name, dtype, quant in MODES if args.only != "kv" else ():
        t0 = time.perf_counter()
        params = checkpoint.to_params(cfg, weights, getattr(jnp, dtype), quant)
        nbytes = weight_bytes(params)
        ppl = perplexity(params, cfg, ids)
        del params
        with LLM(ckpt, slots=4, max_len=128, max_prompt_len=64, dtype=dtype, quantize=quant) as llm:
            out = [r.token_ids for r in llm.generate([c["prompt_ids"] for c in cases], sp)]
        greedy[name] = out
        results.append({"mode": name, "weight_bytes": nbytes, "perplexity": ppl, "seconds": time.perf_counter() - t0})
        print(f"{name}: {nbytes / 2**20:.1f} MiB, perplexity {ppl:.3f}", file=sys.stderr)

    base = greedy["float32"]
    f32_bytes, f32_ppl = results[0]["weight_bytes"], results[0]["perplexity"]
    for r in results:
        out = greedy[r["mode"]]
        div = [first_divergence(o, b) for o, b in zip(out, base)]
        n = len(base[0])
        r["same_as_f32"] = sum(d == n for d in div)
        r["same_as_hf"] = sum(o == c["greedy_ids"] for o, c in zip(out, cases))
        r["prompts"] = len(cases)
        r["mean_prefix_agreement"] = sum(div) / (n * len(div))
        r["diverges_at"] = {c["id"]: d for c, d in zip(cases, div) if d < n}
        r["bytes_vs_f32"] = r["weight_bytes"] / f32_bytes
        r["perplexity_vs_f32"] = r["perplexity"] / f32_ppl

    print(f"| mode | weights (MiB) | vs f32 | perplexity | vs f32 | greedy = f32 (of {len(cases)}) "
          f"| greedy = HF | tokens before divergence | first divergence |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        where = ", ".join(f"{k}@{v}" for k, v in r["diverges_at"].items()) or "none"
        print(f"| {r['mode']} | {r['weight_bytes'] / 2**20:.1f} | {r['bytes_vs_f32']:.3f} | {r['perplexity']:.3f} "
              f"| {r['perplexity_vs_f32']:.4f} | {r['same_as_f32']} | {r['same_as_hf']} "
              f"| {100 * r['mean_prefix_agreement']:.0f}% | {where} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def kv_table(ckpt, cfg, weights, ids: list[int], cases: list[dict], sp, args=None) -> list[dict]:
    """Perplexity and greedy agreement per KV cache type, on the stored weights; prints a table."""
    import dataclasses

    import jax.numpy as jnp

    from jserve import LLM, checkpoint, model
    from jserve.kv_pages import kv_bytes_per_position
    from jserve.quality import perplexity_cached
    from jserve.serving_config import KV_DTYPES

    kinds = list(KV_DTYPES)
    if args is not None and args.kv_dtypes:
        kinds = ["float32"] + [k for k in args.kv_dtypes.split(",") if k != "float32"]
        if unknown := set(kinds) - set(KV_DTYPES):
            raise SystemExit(f"--kv-dtypes: unknown {', '.join(sorted(unknown))}; "
                             f"expected some of {', '.join(KV_DTYPES)}")
    n_prompts = args.kv_prompts if args is not None and args.kv_prompts else len(cases)
    n_tokens = args.kv_tokens if args is not None and args.kv_tokens else sp.max_tokens
    prompts = [c["prompt_ids"] for c in cases][:n_prompts]
    step = max(48, (len(ids) - 48) // max(1, n_prompts - len(prompts)))
    prompts += [ids[a:a + 48] for a in range(0, len(ids) - 48, step)][:n_prompts - len(prompts)]
    sp = dataclasses.replace(sp, max_tokens=n_tokens)
    params = model.for_cpu_kernels(checkpoint.to_params(cfg, weights, jnp.float32, None))
    rows, greedy = [], {}
    for kv in kinds:
        t0 = time.perf_counter()
        ppl = perplexity_cached(params, cfg, ids, getattr(jnp, kv))
        with LLM(ckpt, slots=4, max_len=64 + n_tokens, max_prompt_len=64, kv_dtype=kv) as llm:
            greedy[kv] = [r.token_ids for r in llm.generate(prompts, sp)]
        per_token = kv_bytes_per_position(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv)
        rows.append({"kv_dtype": kv, "bytes_per_token": per_token, "perplexity": ppl,
                     "seconds": time.perf_counter() - t0})
        print(f"kv {kv}: perplexity {ppl:.4f}", file=sys.stderr)
    base = greedy["float32"]
    n = len(base[0])
    hf = min(n, len(cases[0]["greedy_ids"]))
    print(f"| KV cache | bytes/token | 8 x 1024 (MiB) | perplexity | vs f32 KV | greedy = f32 KV (of {len(prompts)} "
          f"x {n}) | tokens = f32 KV's | tokens before divergence "
          f"| first {hf} = HF (of {min(len(cases), len(prompts))}) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        out = greedy[r["kv_dtype"]]
        div = [first_divergence(o, b) for o, b in zip(out, base)]
        r["prompts"], r["tokens"] = len(prompts), n
        r["same_as_f32"] = sum(d == n for d in div)
        r["tokens_equal_f32"] = sum(x == y for o, b in zip(out, base) for x, y in zip(o, b)) / (n * len(base))
        r["same_as_hf"] = sum(o[:hf] == c["greedy_ids"][:hf] for o, c in zip(out, cases))
        r["mean_prefix_agreement"] = sum(div) / (n * len(div))
        r["perplexity_vs_f32"] = r["perplexity"] / rows[0]["perplexity"]
        print(f"| {r['kv_dtype']} | {r['bytes_per_token']} | {r['bytes_per_token'] * 8 * 1024 / 2**20:.0f} "
              f"| {r['perplexity']:.4f} | {r['perplexity_vs_f32']:.5f} | {r['same_as_f32']} "
              f"| {100 * r['tokens_equal_f32']:.1f}% | {100 * r['mean_prefix_agreement']:.1f}% | {r['same_as_hf']} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
