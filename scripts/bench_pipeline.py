"""The serving loop with and without pipelining, where the host's per-token work matters most.

A tiny random model (``--layers`` layers of width ``--dim``, with the default checkpoint's real
tokenizer, so every token is detokenized and checked for stops as in serving) makes a decode step
cost little more than the host's work around it. ``--requests`` requests of ``--max-tokens``
tokens each (``ignore_eos``, one stop string each, so the held-back-text search runs) go through
``jserve.LLM`` with ``pipeline=True`` (step n+1 dispatched before step n's tokens are handled) and
``pipeline=False`` (host and device take turns), rounds interleaved; medians reported.

    python scripts/bench_pipeline.py [--slots 8] [--requests 64] [--max-tokens 64] [--rounds 5]

``--checkpoint DIR`` runs the same on a real checkpoint instead. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile
import time


def tiny_checkpoint(out: pathlib.Path, layers: int, dim: int) -> pathlib.Path:
    from jserve import checkpoint
    from jserve.config import tiny_config
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint

    real = ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    tok = checkpoint.load_tokenizer(real)
    cfg = tiny_config(vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, bos_token_id=1, n_layers=layers,
                      dim=dim, ffn_dim=2 * dim)
    checkpoint.save(out, cfg, checkpoint.random_weights(cfg), None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None, help="default: a tiny random model")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    from jserve import LLM, SamplingParams

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or tiny_checkpoint(pathlib.Path(tmp.name) / "tiny", args.layers, args.dim)
    prompts = [f"Request {i}: tell me about the number {i * 7919 % 1000}." for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, stop=("\n\n\n\n",))
    llms = {on: LLM(ckpt, slots=args.slots, max_len=256, max_prompt_len=64, pipeline=on) for on in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    outputs = {}
    try:
        for llm in llms.values():
            llm.generate(prompts[: args.slots], params)  # untimed
        for _ in range(args.rounds):
            for on, llm in llms.items():
                t0 = time.perf_counter()
                results = llm.generate(prompts, params)
                rates[on].append(sum(r.completion_tokens for r in results) / (time.perf_counter() - t0))
                outputs[on] = [r.token_ids for r in results]
    finally:
        for llm in llms.values():
            llm.close(drain=False)
        tmp.cleanup()
    same = outputs[False] == outputs[True]
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{'tiny model' if args.checkpoint is None else ckpt}, {args.slots} slots, {args.requests} requests x "
          f"{args.max_tokens} tokens, {args.rounds} rounds interleaved (median); same tokens both ways: {same}")
    print("| loop | tokens/s | vs alternating |")
    print("| --- | ---: | ---: |")
    print(f"| alternating (pipeline=False) | {off:.0f} | 1.00 |")
    print(f"| pipelined (pipeline=True) | {on:.0f} | {on / off:.2f} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
