"""Serving configuration: the one set of defaults the server's command line, ``LLM(...)`` and
``scripts/generate.py`` are built from (the model's own architecture is ``jserve.config``).

Three frozen dataclasses, by what they configure:

- ``EngineConfig``: what is compiled and loaded (every process of a multi-host run loads it alike);
- ``SchedulerConfig``: how the orchestrator admits and runs requests;
- ``ServerConfig``: the network front ends (gRPC, HTTP, metrics) and their limits.

Defaults chosen once, for every entry point: ``speculate=0`` (speculative decoding is opt-in:
``--speculate 4`` / ``LLM(speculate=4)``; it pays for a few live streams of repetitive text, seldom
for a full batch, and its verify calls cost compile time and memory whether used or not);
``top_logprobs=5``; and a request's ``max_tokens``, when not given, is the rest of the context
(``jserve.request``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

QUANTIZE_MODES = ("int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float")
DTYPES = ("float32", "bfloat16")
KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def default_dtype(platform: str | None = None) -> str:
    """Float weights' and activations' type where ``EngineConfig.dtype`` is None: float32 on CPU
    (fastest there: the row-invariant kernels multiply float32), bfloat16 on a GPU or TPU (their
    matrix units' type, half the memory traffic). ``platform``: default JAX's backend."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "bfloat16" if platform in ("gpu", "cuda", "rocm", "tpu") else "float32"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """``slots``: requests decoded together. ``max_len``: positions per slot (prompt + output).
    ``max_prompt_len``: longest prompt (None: ``max_len - 1``). ``quantize``: the weights' format
    at load (None: as stored). ``dtype``: float weights and activations (None: ``default_dtype()``,
    float32 on CPU, bfloat16 on a GPU or TPU). ``kv_dtype``: the KV
    cache's elements (None: ``dtype``); attention reads them into float32. bfloat16 by default: half
    of float32's memory, float32's range, and on SmolLM2 perplexity within 0.05 % of a float32
    cache with HF's greedy tokens (scripts/eval_quality.py --only kv); ``"int8"``: int8 values and a
    float32 scale per (position, KV head) vector (``kv_cache.quantize``), 0.53x bfloat16's bytes,
    perplexity +0.23 %. ``top_logprobs``: most alternatives a request may ask for (0 saves a top-k
    per step). ``mesh``: ``"tp=4"``, ``"dp=2,tp=4"`` (None:
    one device). ``speculate``: drafted tokens a decode step may check per slot (0 = off, which
    also saves compiling the checking step). ``kv_memory``: the KV page pool's size, bytes or a size
    such as ``"512MiB"`` (None: what ``slots x max_len`` positions take, ``kv_pages.default_kv_memory``);
    slots take pages as their sequences grow, so ``slots`` and ``max_len`` reserve no memory."""

    slots: int = 8
    max_len: int = 1024
    max_prompt_len: int | None = None
    quantize: str | None = None
    dtype: str | None = None
    kv_dtype: str | None = "bfloat16"
    top_logprobs: int = 5
    mesh: str | None = None
    indivisible: str = "replicate"
    speculate: int = 0
    kv_memory: int | str | None = None


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """``max_waiting``: bound of the waiting queue. ``prefill_budget``: prompt tokens run per
    decode step while streams are live. ``prefix_cache``: reuse the keys/values of prompt prefixes
    already held by some slot. ``speculate_default``: whether requests that do not say use
    speculative decoding. ``max_undelivered``: pieces a consumer may leave unread before its
    request ends (``slow_reader``). ``pipeline``: dispatch each step before handling the last.
    ``kv_headroom``: with a paged KV pool, pages admission keeps free for each running request's
    growth (at most what it needs to its end); 0 admits whenever a prompt fits."""

    max_waiting: int = 256
    prefill_budget: int = 64
    prefix_cache: bool = True
    speculate_default: bool = True
    max_undelivered: int = 1024
    pipeline: bool = True
    kv_headroom: int = 1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The network edge: addresses, the largest request accepted, the drain on SIGTERM."""

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None
    metrics_port: int | None = None
    max_request_bytes: int = 4 << 20
    drain_timeout: float = 30.0
    tool_call_format: str | None = None


def split_settings(engine: EngineConfig | None, scheduler: SchedulerConfig | None,
                   settings: dict[str, Any]) -> tuple[EngineConfig, SchedulerConfig]:
    """``engine`` and ``scheduler`` (defaults when None) with ``settings`` (field name → value,
    e.g. ``LLM(slots=4)``) applied to whichever has the field; ``TypeError`` for an unknown one."""
    engine, scheduler = engine or EngineConfig(), scheduler or SchedulerConfig()
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = set(settings) - names - {f.name for f in dataclasses.fields(SchedulerConfig)}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    engine = dataclasses.replace(engine, **{k: v for k, v in settings.items() if k in names})
    scheduler = dataclasses.replace(scheduler, **{k: v for k, v in settings.items() if k not in names})
    return engine, scheduler


# ---- argument types: a value out of range is refused while parsing, naming the flag --------------
def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``lo`` (and <= ``hi``), else argparse's error naming the flag."""
    words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}")
        return value

    parse.__name__ = words  # argparse's own messages name the type by it
    return parse


def seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def memory_size(text: str) -> str:
    """An argparse ``type``: a memory size as ``kv_pages.parse_memory_size`` reads it (``512MiB``),
    kept as written (``EngineConfig.kv_memory`` takes the text)."""
    from jserve.kv_pages import parse_memory_size

    try:
        parse_memory_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


PORT = int_in(0, 65535)


def check_engine_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no one flag's type can check: a prompt must leave room for a token in its context."""
    if args.max_prompt_len is not None and args.max_prompt_len >= args.max_len:
        ap.error(f"--max-prompt-len ({args.max_prompt_len}) must be below --max-len ({args.max_len}): a prompt "
                 "leaves room for at least one generated token")


def add_engine_flags(ap: argparse.ArgumentParser, unit: str = "a request") -> None:
    """The ``EngineConfig`` flags every entry point shares (``--slots``, ``--max-len``,
    ``--max-prompt-len``, ``--speculate``, ``--quantize``, ``--dtype``, ``--kv-dtype``), with its defaults and one
    wording; ``unit`` names what asks for tokens (a request, an input line)."""
    e = EngineConfig()
    ap.add_argument("--slots", type=int_in(1), default=e.slots, help=f"requests decoded together (default {e.slots})")
    ap.add_argument("--max-len", type=int_in(2), default=e.max_len,
                    help=f"positions per slot: prompt + output (default {e.max_len}); {unit} without "
                         "max_tokens may generate up to the end of this context")
    ap.add_argument("--max-prompt-len", type=int_in(1), default=e.max_prompt_len,
                    help="longest prompt accepted (default max-len - 1)")
    ap.add_argument("--speculate", type=int_in(0), default=e.speculate, metavar="K",
                    help="speculative decoding: a decode step may check up to K tokens drafted by prompt lookup "
                         "(the request's own earlier text) per slot, and keeps those the model agrees with, so "
                         "the output is unchanged; used only while measured to pay (default "
                         f"{e.speculate} = off, which also saves compiling the checking step; 4 is a good K)")
    ap.add_argument("--quantize", choices=QUANTIZE_MODES, default=e.quantize,
                    help="weights' format, applied at load (default: as the checkpoint stores them; a GGUF's "
                         "Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K blocks stay blocks): int8 = per-channel weight-only "
                         "(GPU/TPU fast path), int8-dynamic = int8 weights and per-row int8 activations, "
                         "q8_0/q4_0/q4_1 = GGUF block formats, float = every weight dequantized to --dtype "
                         "(to compare quality)")
    ap.add_argument("--dtype", choices=DTYPES, default=e.dtype,
                    help="float weights and activations (default: float32 on CPU, fastest there; bfloat16 on "
                         "a GPU or TPU)")
    ap.add_argument("--kv-dtype", choices=KV_DTYPES, default=e.kv_dtype,
                    help=f"the KV cache's elements (default {e.kv_dtype}: half of float32's memory, float32's "
                         "range; attention still computes in float32); int8 = each key and value vector as "
                         "int8 with a float32 scale, 0.53x bfloat16's memory (on SmolLM2 perplexity +0.23%% "
                         "vs a float32 cache, bfloat16 +0.05%%); float32 to compare")
    ap.add_argument("--kv-memory", type=memory_size, default=e.kv_memory, metavar="SIZE",
                    help="memory of the KV cache's page pool, e.g. 512MiB or 4GiB (default: what --slots x "
                         "--max-len positions take); requests take pages as they grow and wait, or are "
                         "preempted and resumed, when it is full, so --slots and --max-len reserve nothing")
