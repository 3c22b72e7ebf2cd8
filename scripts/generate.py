"""Batch offline generation: JSONL in, JSONL out, through jserve's continuous batching.

Input, one JSON object per line (exactly one of ``prompt``, ``messages``, ``token_ids``)::

    {"id": "a", "prompt": "Once upon a time"}
    {"id": "b", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}
    {"id": "c", "token_ids": [1, 2, 3], "max_tokens": 16, "stop": ["\\n"]}

Optional fields, with the defaults every jserve front end has (``jserve.request``): max_tokens
(the rest of the context), temperature (1.0; 0 = greedy), top_k, top_p, min_p, seed, stop (a
string or a list of strings), stop_token_ids, repetition_penalty, presence_penalty,
frequency_penalty, ignore_eos, speculate. A line is checked, and refused with the same message,
as the gRPC and HTTP servers check a request. The command line's defaults are the server's
(``jserve.serving_config``).

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
# Sampling fields a line may carry: their types are checked by the request layer (``jserve.request``,
# one wording for every front end).
PARAMS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
          "presence_penalty", "frequency_penalty", "ignore_eos", "speculate")


class LineError(ValueError):
    pass


def parse_line(obj: Any) -> tuple[str, Any, Any]:
    """``(id, prompt input, SamplingParams)`` of one input object; ``LineError`` for a line that is
    not a request, ``RequestError`` (the request layer's) for a request that cannot be served."""
    if not isinstance(obj, dict):
        raise LineError(f"each line must be a JSON object, got {type(obj).__name__}")
    from jserve.request import sampling_params
    from jserve.sampling import MAX_REQUEST_ID_CHARS

    rid = obj.get("id")
    if not isinstance(rid, str):
        raise LineError("missing or non-string \"id\"")
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise LineError(f"\"id\" has {len(rid)} characters; at most {MAX_REQUEST_ID_CHARS} are allowed")
    given = [k for k in INPUT_KEYS if k in obj]
    if len(given) != 1:
        raise LineError(f"exactly one of {', '.join(INPUT_KEYS)} is required, got {given or 'none'}")
    unknown = sorted(set(obj) - {"id", *INPUT_KEYS, *PARAMS, "stop", "stop_token_ids"})
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
    kwargs = {key: obj[key] for key in PARAMS if key in obj}
    ids = obj.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise LineError("\"stop_token_ids\" must be a list of integers")
    return rid, prompt, sampling_params(stop=obj.get("stop"), stop_token_ids=ids, **kwargs)


def parse_lines(lines: list[str], max_line_bytes: int) -> tuple[list[dict[str, Any] | None], list[tuple]]:
    """Error records in place (None where a request runs) and the requests: (record index, id,
    prompt, SamplingParams)."""
    from jserve.errors import RequestError
    from jserve.sampling import MAX_REQUEST_ID_CHARS

    records: list[dict[str, Any] | None] = []
    requests: list[tuple[int, str, Any, Any]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        size = len(line.encode("utf-8", "surrogatepass"))
        if size > max_line_bytes:
            records.append({"line": n, "error": f"line of {size} bytes exceeds --max-line-bytes={max_line_bytes}"})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            records.append({"line": n, "error": f"invalid JSON: {e}"})
            continue
        try:
            rid, prompt, params = parse_line(obj)
        except (LineError, RequestError) as e:
            rid = obj.get("id") if isinstance(obj, dict) else None
            key = {"id": rid} if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID_CHARS else {"line": n}
            records.append({**key, "error": str(e)})
            continue
        requests.append((len(records), rid, prompt, params))
        records.append(None)
    return records, requests


def record(rid: str, r: Any) -> dict[str, Any]:
    """The output record of a finished request (a ``Result``) or a refused one (a ``RequestError``)."""
    if isinstance(r, Exception):
        return {"id": rid, "error": str(r)}
    if r.error is not None:
        return {"id": rid, "error": r.error}
    return {"id": rid, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}


def build_parser() -> argparse.ArgumentParser:
    from jserve.serving_config import add_engine_flags, int_in  # the server's flags and defaults, one set

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None,
                    help="jserve checkpoint directory (default: the SmolLM2 checkpoint, converted if missing)")
    ap.add_argument("--input", required=True, help="input JSONL file ('-' for stdin)")
    ap.add_argument("--output", required=True, help="output JSONL file ('-' for stdout)")
    add_engine_flags(ap, "a line")
    ap.add_argument("--max-line-bytes", type=int_in(1), default=4 << 20,
                    help="longest input line, in bytes (default 4 MiB); a longer one gets an error record "
                         "without being parsed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true", help="log loading and compilation")
    return ap


def run(llm: Any, lines: list[str], max_line_bytes: int = 4 << 20, write: Any = None,
        progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every line's record, in input order, and the token totals; ``write(record)`` is called for
    each as soon as it and all before it are done, ``progress()`` once per finished request."""
    records, requests = parse_lines(lines, max_line_bytes)
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    written = 0

    def flush_ready() -> None:
        nonlocal written
        while written < len(records) and records[written] is not None:
            if write is not None:
                write(records[written])
            written += 1

    def on_finish(i: int, r: Any) -> None:
        idx, rid = requests[i][0], requests[i][1]
        records[idx] = record(rid, r)
        if "error" not in records[idx]:
            totals["prompt_tokens"] += r.prompt_tokens
            totals["completion_tokens"] += r.completion_tokens
        if progress is not None:
            progress()
        flush_ready()

    flush_ready()
    llm.generate([r[2] for r in requests], [r[3] for r in requests], on_finish=on_finish)
    flush_ready()
    return records, totals


def main(argv: list[str] | None = None) -> int:
    from jserve.serving_config import check_engine_args

    ap = build_parser()
    args = ap.parse_args(argv)
    check_engine_args(ap, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from jserve import LLM
    from jserve.llm import DEFAULT_COMPILE_CACHE
    from jserve.serving_config import EngineConfig

    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    with src:
        lines = src.read().splitlines()
    engine = EngineConfig(slots=args.slots, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
                          dtype=args.dtype, kv_dtype=args.kv_dtype, quantize=args.quantize,
                          speculate=args.speculate, kv_memory=args.kv_memory)
    llm = LLM(args.checkpoint, engine=engine,
              compile_cache=DEFAULT_COMPILE_CACHE)  # this process is ours: JAX's persistent cache on
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    bar = tqdm(total=None, unit="req", disable=args.no_progress, file=sys.stderr)

    def write(rec: dict[str, Any]) -> None:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        records, totals = run(llm, lines, args.max_line_bytes, write, lambda: bar.update(1))
    finally:
        bar.close()
        llm.close()
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - t0
    errors = sum(1 for r in records if "error" in r)
    summary = {"requests": len(records), "errors": errors, **totals, "seconds": round(seconds, 3),
               "tokens_per_second": round(totals["completion_tokens"] / seconds, 2) if seconds > 0 else None}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
