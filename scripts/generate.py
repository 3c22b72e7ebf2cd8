"""Batch offline generation: JSONL in, JSONL out, through jserve's continuous batching.

Input, one JSON object per line (exactly one of ``prompt``, ``messages``, ``token_ids``)::

    {"id": "a", "prompt": "Once upon a time"}
    {"id": "b", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}
    {"id": "c", "token_ids": [1, 2, 3], "max_tokens": 16, "stop": ["\\n"]}

Optional fields: max_tokens (128), temperature (1.0; 0 = greedy), top_k, top_p, min_p, seed,
stop (list of strings), stop_token_ids, repetition_penalty, presence_penalty,
frequency_penalty, ignore_eos.

Output, one line per input line in the same order::

    {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}

or ``{"id" (or "line"), "error": "<reason>"}`` for a line that cannot be served; the other
lines are still processed. A one-line JSON summary goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any

from tqdm import tqdm

INPUT_KEYS = ("prompt", "messages", "token_ids")
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "min_p": (int, float), "seed": (int,), "repetition_penalty": (int, float),
    "presence_penalty": (int, float), "frequency_penalty": (int, float), "ignore_eos": (bool,),
    "speculate": (bool,),
}


class LineError(ValueError):
    pass


def parse_line(obj: Any) -> tuple[str, Any, dict[str, Any]]:
    """``(id, prompt input, SamplingParams kwargs)`` of one input object, or ``LineError``."""
    if not isinstance(obj, dict):
        raise LineError(f"each line must be a JSON object, got {type(obj).__name__}")
    from jserve.sampling import MAX_REQUEST_ID_CHARS

    rid = obj.get("id")
    if not isinstance(rid, str):
        raise LineError("missing or non-string \"id\"")
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise LineError(f"\"id\" has {len(rid)} characters; at most {MAX_REQUEST_ID_CHARS} are allowed")
    given = [k for k in INPUT_KEYS if k in obj]
    if len(given) != 1:
        raise LineError(f"exactly one of {', '.join(INPUT_KEYS)} is required, got {given or 'none'}")
    unknown = sorted(set(obj) - {"id", *INPUT_KEYS, *PARAM_TYPES, "stop", "stop_token_ids"})
    if unknown:
        raise LineError(f"unknown fields {unknown}")
    prompt = obj[given[0]]
    if given[0] == "prompt" and not isinstance(prompt, str):
        raise LineError("\"prompt\" must be a string")
    if given[0] == "messages" and not (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
        raise LineError("\"messages\" must be a list of {\"role\", \"content\"} objects")
    if given[0] == "token_ids" and not (isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise LineError("\"token_ids\" must be a list of integers")
    kwargs: dict[str, Any] = {}
    for key, types in PARAM_TYPES.items():
        if key in obj:
            v = obj[key]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                raise LineError(f"\"{key}\" must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
            kwargs[key] = float(v) if float in types else v
    if "stop" in obj:
        stop = obj["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise LineError("\"stop\" must be a list of strings")
        kwargs["stop"] = tuple(stop)
    if "stop_token_ids" in obj:
        ids = obj["stop_token_ids"]
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise LineError("\"stop_token_ids\" must be a list of integers")
        kwargs["stop_token_ids"] = tuple(ids)
    return rid, prompt, kwargs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None,
                    help="jserve checkpoint directory (default: the SmolLM2 checkpoint, converted if missing)")
    ap.add_argument("--input", required=True, help="input JSONL file ('-' for stdin)")
    ap.add_argument("--output", required=True, help="output JSONL file ('-' for stdout)")
    ap.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    ap.add_argument("--max-len", type=int, default=1024, help="positions per slot: prompt + output (default 1024)")
    ap.add_argument("--max-prompt-len", type=int, default=None, help="longest prompt (default max-len - 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"],
                    help="weights' format at load (default: as stored): int8, int8-dynamic (activations too), "
                         "q8_0/q4_0/q4_1 block formats, or float (a block checkpoint dequantized)")
    ap.add_argument("--speculate", type=int, default=0, metavar="K",
                    help="speculative decoding with prompt-lookup drafts of up to K tokens (default 0 = off: a "
                         "batch keeps every slot busy, where it seldom pays); a line's 'speculate' key opts out")
    ap.add_argument("--max-line-bytes", type=int, default=4 << 20,
                    help="longest input line, in bytes (default 4 MiB); a longer one gets an error record "
                         "without being parsed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true", help="log loading and compilation")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from jserve import LLM, SamplingParams
    from jserve.llm import DEFAULT_COMPILE_CACHE
    from jserve.sampling import MAX_REQUEST_ID_CHARS, InvalidRequestError

    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with src:
        lines = [ln for ln in src.read().splitlines()]
    records: list[dict[str, Any] | None] = []  # error records in place; None where a request runs
    requests: list[tuple[int, str, Any, Any]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        size = len(line.encode("utf-8", "surrogatepass"))
        if size > args.max_line_bytes:
            records.append({"line": n, "error": f"line of {size} bytes exceeds --max-line-bytes={args.max_line_bytes}"})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            records.append({"line": n, "error": f"invalid JSON: {e}"})
            continue
        try:
            rid, prompt, kwargs = parse_line(obj)
            params = SamplingParams(**kwargs)
        except LineError as e:
            rid = obj.get("id") if isinstance(obj, dict) else None
            key = {"id": rid} if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_CHARS else {"line": n}
            records.append({**key, "error": str(e)})
            continue
        requests.append((len(records), rid, prompt, params))
        records.append(None)

    llm = LLM(args.checkpoint, slots=args.slots, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
              dtype=args.dtype, quantize=args.quantize, speculate=args.speculate,
              compile_cache=DEFAULT_COMPILE_CACHE)  # this process is ours: JAX's persistent cache on
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    bar = tqdm(total=len(requests), unit="req", disable=args.no_progress, file=sys.stderr)
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    written = 0

    def flush_ready() -> None:
        nonlocal written
        while written < len(records) and records[written] is not None:
            out.write(json.dumps(records[written], ensure_ascii=False) + "\n")
            written += 1
        out.flush()

    def on_finish(i: int, r: Any) -> None:
        idx, rid = requests[i][0], requests[i][1]
        if isinstance(r, InvalidRequestError):
            records[idx] = {"id": rid, "error": str(r)}
        elif r.error is not None:
            records[idx] = {"id": rid, "error": r.error}
        else:
            records[idx] = {"id": rid, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}
            totals["prompt_tokens"] += r.prompt_tokens
            totals["completion_tokens"] += r.completion_tokens
        bar.update(1)
        flush_ready()

    t0 = time.perf_counter()
    try:
        flush_ready()
        llm.generate([r[2] for r in requests], [r[3] for r in requests], on_finish=on_finish)
        flush_ready()
    finally:
        bar.close()
        llm.close()
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - t0
    errors = sum(1 for r in records if r is not None and "error" in r)
    summary = {"requests": len(records), "errors": errors, **totals, "seconds": round(seconds, 3),
               "tokens_per_second": round(totals["completion_tokens"] / seconds, 2) if seconds > 0 else None}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
