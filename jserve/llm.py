"""The Python API: ``jserve.LLM``, used by the offline script, the server and Python users.

    llm = LLM()                                   # the default SmolLM2 checkpoint, 8 slots
    results = llm.generate(["Hello", [{"role": "user", "content": "Hi!"}]],
                           SamplingParams(temperature=0, max_tokens=32))
    async for piece in llm.stream("Once upon a time", SamplingParams()):
        print(piece.text, end="")
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import logging
import os
import pathlib
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from jserve import request as rq
from jserve.errors import ErrorKind, InvalidRequestError, RequestError
from jserve.kv_pages import parse_memory_size
from jserve.orchestrator import Orchestrator, QueueFullError, ShuttingDownError, Stream, StreamOutput
from jserve.request import FinishReason, GenerateRequest, Limits, PromptInput, normalize_chat
from jserve.sampling import SamplingParams
from jserve.serving_config import KV_DTYPES, EngineConfig, SchedulerConfig, default_dtype, split_settings
from jserve.tokenizer import ChatTemplateError

log = logging.getLogger(__name__)

DEFAULT_COMPILE_CACHE = pathlib.Path(os.environ.get("JSERVE_COMPILE_CACHE",
                                                    pathlib.Path.home() / ".cache" / "jserve" / "xla"))


@dataclasses.dataclass
class Result:
    """A finished request, as ``LLM.generate`` returns it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason  # a StrEnum: compares equal to its string ("stop", "length", ...)
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


# LLMs not closed yet: closed (without draining) when the interpreter exits, so that the decode
# loop's thread is stopped before the runtime under it is torn down.
_OPEN: weakref.WeakSet[LLM] = weakref.WeakSet()


@atexit.register
def _close_open() -> None:
    for llm in list(_OPEN):
        try:
            llm.close(drain=False, timeout=5.0)
        except Exception:  # exiting anyway: one failing close must not skip the others
            log.exception("could not close an LLM at exit")


class _Collector(Stream):
    """An offline request's stream: each piece is kept as the orchestrator hands it over, so
    nothing is ever left undelivered (no slow-reader bound applies); ``done`` is set with the
    final piece."""

    def __init__(self):
        super().__init__()
        self.pieces: list[StreamOutput] = []
        self.done = threading.Event()

    def put(self, out: StreamOutput) -> None:
        self.pieces.append(out)
        if out.finish_reason is not None:
            self.done.set()

    def backlog(self) -> int:
        return 0


def _cancel_orphan(work: asyncio.Future) -> None:
    """Cancel the request a submission queued after its caller went away."""
    if not work.cancelled() and work.exception() is None:
        work.result().cancel()


def collect(pieces: Sequence[StreamOutput]) -> Result:
    last = pieces[-1]
    return Result(
        text="".join(p.text for p in pieces),
        token_ids=[t for p in pieces for t in p.token_ids],
        logprobs=[lp for p in pieces for lp in p.logprobs],
        finish_reason=FinishReason(last.finish_reason or FinishReason.ERROR),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        error=last.error,
        cached_tokens=last.cached_tokens,
    )


def enable_compile_cache(directory: pathlib.Path | None) -> None:
    """Turn on JAX's persistent compilation cache in ``directory``, so a restart skips compilation.

    This sets ``jax.config`` for the whole process: for what owns the process (the server and
    script entry points pass ``DEFAULT_COMPILE_CACHE``), never done by ``LLM`` unless asked."""
    import jax

    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint loaded into a warmed-up engine (what ``LLM`` and multi-host followers share)."""

    checkpoint: pathlib.Path
    config: Any  # ModelConfig
    tokenizer: Any  # TextTokenizer | None
    engine: Any  # JaxEngine
    quantize: str | None
    weight_bytes: int
    warmup_seconds: float
    dtype: str = "float32"  # float weights and activations, as loaded


def load_engine(checkpoint: str | os.PathLike | None = None, config: EngineConfig | None = None, *,
                compile_cache: pathlib.Path | None = None, warmup: bool = True) -> LoadedModel:
    """Load ``checkpoint`` (default: SmolLM2, converted on first use) into a ``JaxEngine`` built
    as ``config`` says (``jserve.serving_config.EngineConfig``; its defaults when None).

    ``config.mesh`` (``"tp=4"``, ``"dp=2,tp=4"``) shards the model and the decode state over that
    many devices (see ``jserve.sharding``); ``None`` uses one device, or with several processes
    (``jax.distributed``) ``tp`` over every device of every process, and no speculative decoding
    (the leader mirrors no verify to the others). ``compile_cache``: as ``LLM``'s.
    """
    import jax
    import jax.numpy as jnp

    from jserve import checkpoint as ckpt
    from jserve import sharding
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.quant import check_mode, weight_bytes, weight_format

    c = config or EngineConfig()
    if c.quantize is not None:
        check_mode(c.quantize)
    dtype = c.dtype or default_dtype()
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    kv_dtype = dtype if c.kv_dtype is None else c.kv_dtype
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    kv_memory = parse_memory_size(c.kv_memory) if isinstance(c.kv_memory, str) else c.kv_memory
    enable_compile_cache(compile_cache)
    path = pathlib.Path(checkpoint) if checkpoint is not None else ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    mesh, speculate = c.mesh, c.speculate
    if jax.process_count() > 1:
        if speculate:
            log.info("speculative decoding is off with several processes")
            speculate = 0
        if mesh is None:
            mesh = f"tp={jax.device_count()}"
            log.info("%d processes and no --mesh: using %s over all %d devices", jax.process_count(), mesh,
                     jax.device_count())
    plan = None
    if mesh is not None:
        plan = sharding.plan(sharding.make_mesh(mesh), ckpt.load_config(path), c.slots, indivisible=c.indivisible)
        log.info("sharding: %s", plan.describe())
    t0 = time.perf_counter()
    config_, params, tokenizer = ckpt.load(path, getattr(jnp, dtype), c.quantize, plan=plan)
    model_config = config_.for_context(c.max_len)
    mode = weight_format(params)  # "int8", "q4_1+q8_0", ...; None: all float
    nbytes = weight_bytes(params)
    log.info("loaded %s (%d layers, dim %d, vocab %d; %s weights, %.1f MiB in all) in %.1fs", path,
             model_config.n_layers, model_config.dim, model_config.vocab_size, mode or dtype, nbytes / 2**20,
             time.perf_counter() - t0)
    engine = JaxEngine(model_config, params, slots=c.slots, max_len=c.max_len, max_prompt_len=c.max_prompt_len,
                       cache_dtype=getattr(jnp, kv_dtype), top_logprobs=c.top_logprobs, plan=plan,
                       speculate=speculate, kv_memory=kv_memory)
    seconds = engine.warmup() if warmup else 0.0
    if warmup:
        log.info("warm-up: ready to serve in %.1fs (the other call shapes compile in the background)", seconds)
    return LoadedModel(path, model_config, tokenizer, engine, mode, nbytes, seconds, dtype)


class LLM:
    """A model loaded into a ``JaxEngine`` with an ``Orchestrator`` running continuous batching.

    Built from ``engine`` (``EngineConfig``: slots, max_len, max_prompt_len, quantize, dtype,
    top_logprobs, mesh, indivisible, speculate) and ``scheduler`` (``SchedulerConfig``:
    max_waiting, prefill_budget, prefix_cache, speculate_default, max_undelivered, pipeline, kv_headroom), the
    same dataclasses the server's command line and ``scripts/generate.py`` are built from, so
    their defaults are one (``jserve.serving_config`` documents each). Any of their fields may
    also be given by name: ``LLM(ckpt, slots=4, max_len=256, speculate=4)``.

    ``quantize``: None (as stored: a GGUF's blocks stay blocks), ``"int8"`` (weight-only),
    ``"int8-dynamic"`` (weights and activations), ``"q8_0"``/``"q4_0"``/``"q4_1"`` (block formats)
    or ``"float"`` (everything dequantized to ``dtype``), applied at load. With several processes
    (``jax.distributed``) the LLM lives on process 0 and the others run ``multihost.follow``.
    ``on_fatal(message)`` is called (on the orchestrator's thread) if the engine fails and cannot
    be rebuilt: every request has then ended with an error and new ones are refused.
    ``max_undelivered`` does not bound ``generate``'s requests: it keeps every piece as it comes.
    ``compile_cache``: a directory for JAX's persistent compilation cache (``enable_compile_cache``:
    a process-wide ``jax.config`` setting, so off unless given; the server and
    ``scripts/generate.py`` use ``DEFAULT_COMPILE_CACHE``).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, engine: EngineConfig | None = None,
                 scheduler: SchedulerConfig | None = None, compile_cache: pathlib.Path | None = None,
                 warmup: bool = True, on_event: Callable[[str, Any, float], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None, **settings: Any):
        import jax

        if jax.process_index() != 0:
            raise RuntimeError("with several processes the LLM runs on process 0; the others run "
                               "jserve.multihost.follow(load_engine(...).engine)")
        self.engine_config, self.scheduler_config = split_settings(engine, scheduler, settings)
        m = load_engine(checkpoint, self.engine_config, compile_cache=compile_cache, warmup=warmup)
        if jax.process_count() > 1:
            from jserve.multihost import LeaderEngine

            m = dataclasses.replace(m, engine=LeaderEngine(m.engine))
        self._start(m, on_event, on_fatal)

    @classmethod
    def over(cls, model: LoadedModel, *, scheduler: SchedulerConfig | None = None,
             on_event: Callable[[str, Any, float], None] | None = None,
             on_fatal: Callable[[str], None] | None = None, **settings: Any) -> LLM:
        """An LLM over an engine already built (``model.engine``: any ``engine_api.Engine``, e.g.
        the tests' mock engine): no checkpoint is read, nothing is compiled, JAX is not touched.
        ``scheduler`` and ``settings``: as ``LLM``'s (engine fields describe ``model.engine``)."""
        self = cls.__new__(cls)
        self.engine_config, self.scheduler_config = split_settings(None, scheduler, settings)
        self._start(model, on_event, on_fatal)
        return self

    def _start(self, m: LoadedModel, on_event: Callable[[str, Any, float], None] | None,
               on_fatal: Callable[[str], None] | None) -> None:
        self.dtype, self.quantize = self.engine_config.dtype or m.dtype, m.quantize
        self.checkpoint, self.config, self.tokenizer = m.checkpoint, m.config, m.tokenizer
        self.weight_bytes, self.warmup_seconds = m.weight_bytes, m.warmup_seconds
        self.engine = m.engine
        self._grammars = None  # built on the first constrained request
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids
        s = self.scheduler_config
        self.orchestrator = Orchestrator(self.engine, self.tokenizer, eos_token_ids=tuple(eos),
                                         max_waiting=s.max_waiting, prefill_budget=s.prefill_budget,
                                         on_event=on_event, pipeline=s.pipeline, on_fatal=on_fatal,
                                         max_undelivered=s.max_undelivered, prefix_cache=s.prefix_cache,
                                         speculate=s.speculate_default, kv_headroom=s.kv_headroom)
        tok = self.tokenizer
        self.limits = Limits(vocab_size=self.config.vocab_size, max_len=self.engine.max_len,
                             max_prompt_len=self.engine.max_prompt_len, max_logprobs=self.engine.top_logprobs,
                             max_token_bytes=tok.max_token_bytes if tok is not None else None,
                             kv_positions=(self.engine.pages.num_pages * self.engine.page_size
                                           if getattr(self.engine, "paged", False) else None))
        _OPEN.add(self)

    # ---- the request layer's checks, then tokenizing ---------------------------------------------
    def prepare(self, prompt: PromptInput, params: SamplingParams | None = None) -> list[int]:
        """Token ids for ``prompt`` after checking it and ``params``; ``InvalidRequestError`` if not servable."""
        return self._prepare(GenerateRequest(prompt, params))[0]

    def _prepare(self, request: GenerateRequest) -> tuple[list[int], SamplingParams]:
        """``jserve.request``'s checks around tokenizing: the ids and the resolved parameters."""
        params = rq.check(request, self.limits)
        return (ids := self.tokenize_input(request.prompt)), rq.fit(ids, params, self.limits)

    def _check_text_fits(self, text: str, what: str) -> None:
        rq.check_text_fits(text, what, self.limits)

    def tokenize_input(self, prompt: PromptInput) -> list[int]:
        """Token ids of a prompt (text, chat messages or token ids), checked as ``jserve.request`` checks it."""
        kind = rq.prompt_kind(prompt, self.limits)
        if kind == "text":
            return self._require_tokenizer().encode(prompt)
        if kind == "chat":
            return self.encode_chat(prompt)
        return list(prompt)

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                    **template_kwargs: Any) -> list[int]:
        """Token ids of a chat (OpenAI's messages) rendered by the model's template.

        ``messages``: ``role`` (system, developer, user, assistant, tool), ``content`` (text, a list
        of text parts, or None for an assistant turn), and ``name``, ``tool_calls``,
        ``tool_call_id``, ``reasoning_content``; a ``developer`` turn is rendered as ``system``.
        ``tools`` and ``template_kwargs`` go to the template (``tools``: OpenAI's tool dicts)."""
        text = self._tokenizer_render(normalize_chat(messages), tools, template_kwargs)
        self._check_text_fits(text, "the chat (rendered with its template)")
        return self._require_tokenizer().encode_rendered(text)

    def _tokenizer_render(self, messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                          template_kwargs: dict[str, Any]) -> str:
        tok = self._require_tokenizer()
        try:
            return tok.render_chat(messages, tools=tools, **template_kwargs)
        except ChatTemplateError as e:
            raise InvalidRequestError(str(e)) from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a template choking on a message's shape
            raise InvalidRequestError(f"the chat template could not render these messages: {e}") from e

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidRequestError("this checkpoint has no tokenizer; send token ids")
        return self.tokenizer

    # ---- running requests -----------------------------------------------------------------
    def submit(self, prompt: PromptInput, params: SamplingParams | None = None, *, request_id: str | None = None,
               timeout: float | None = None, loop: asyncio.AbstractEventLoop | None = None,
               block: bool = False) -> Stream:
        """Validate and queue one request; iterate the returned ``Stream`` for its output.

        Refused with a ``RequestError``: ``INVALID`` (the message says why), ``QUEUE_FULL`` (unless
        ``block``), ``SHUTTING_DOWN``."""
        return self._submit(GenerateRequest(prompt, params, request_id, timeout), Stream(loop), block=block)

    async def submit_async(self, prompt: PromptInput, params: SamplingParams | None = None, *,
                           request_id: str | None = None, timeout: float | None = None) -> Stream:
        """``submit`` for the event loop's front ends: validation, tokenizing and chat templates run
        in the loop's executor (other streams keep flowing), and the stream delivers on this loop.

        If the caller is cancelled (its client went away) while that runs, the request it queues
        is cancelled as soon as it is queued: no slot is held for nobody."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, functools.partial(self.submit, prompt, params, request_id=request_id,
                                                            timeout=timeout, loop=loop))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(_cancel_orphan)
            raise

    def _submit(self, request: GenerateRequest, stream: Stream, *, block: bool = False) -> Stream:
        ids, params = self._prepare(request)
        matcher = self._matcher(params)
        deadline = time.monotonic() + request.timeout if request.timeout is not None else None
        try:
            return self.orchestrator.submit(ids, params, stream, request_id=request.request_id, deadline=deadline,
                                            block=block, matcher=matcher)
        except QueueFullError as e:
            raise RequestError(ErrorKind.QUEUE_FULL, str(e)) from e
        except ShuttingDownError as e:
            raise RequestError(ErrorKind.SHUTTING_DOWN, str(e)) from e

    def _matcher(self, params: SamplingParams):
        """The compiled constraint of a structured-output request (None without one)."""
        if params.constraint is None:
            return None
        import jax

        if jax.process_count() > 1:
            raise InvalidRequestError("structured output is not supported across several processes")
        if self._grammars is None:
            from jserve.structured import Grammars

            eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, tuple(eos))
        return self._grammars.matcher(params.constraint)

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_finish: Callable[[int, Result | RequestError], None] | None = None,
                 ) -> list[Result | RequestError]:
        """Run all prompts through continuous batching; results in input order.

        A prompt that fails validation yields its ``RequestError`` (an ``InvalidRequestError``) in its place; the
        others still run. ``on_finish(index, result)`` is called for each, in input order.
        """
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        # Submit from a helper thread (it blocks while the waiting queue is full) and hand results
        # out here in input order, while later prompts still run. Every piece is kept as it comes
        # (``_Collector``): an output waiting for the ones before it is never cut as a slow reader.
        submitted: queue.Queue[_Collector | Exception] = queue.Queue()

        def submit_all() -> None:
            for prompt, p in zip(prompts, plist):
                try:
                    submitted.put(self._submit(GenerateRequest(prompt, p), _Collector(), block=True))
                except Exception as e:  # handed to the caller in this prompt's place
                    submitted.put(e)

        threading.Thread(target=submit_all, name="jserve-submit", daemon=True).start()
        results: list[Result | RequestError] = []
        for i in range(len(prompts)):
            s = submitted.get()
            if isinstance(s, RequestError) and s.kind == ErrorKind.INVALID:
                r: Result | RequestError = s
            elif isinstance(s, Exception):
                raise s
            else:
                s.done.wait()
                r = collect(s.pieces)
            results.append(r)
            if on_finish is not None:
                on_finish(i, r)
        return results

    async def stream(self, prompt: PromptInput, params: SamplingParams | None = None, *,
                     request_id: str | None = None, timeout: float | None = None) -> AsyncIterator[StreamOutput]:
        """Stream one request's output pieces; cancelling the consumer cancels the request."""
        s = self.submit(prompt, params, request_id=request_id, timeout=timeout, loop=asyncio.get_running_loop())
        try:
            async for piece in s:
                yield piece
        finally:
            s.cancel()  # a no-op once finished; frees the slot if the consumer went away

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> bool:
        _OPEN.discard(self)
        drained = self.orchestrator.shutdown(drain=drain, timeout=timeout)
        close = getattr(self.engine, "close", None)
        if close is not None:  # multi-host: tell the other processes to stop
            close()
        return drained

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=False)
