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

from jserve.orchestrator import Orchestrator, Stream, StreamOutput
from jserve.sampling import MAX_CHAT_MESSAGES, MAX_REQUEST_ID_CHARS, InvalidRequestError, SamplingParams
from jserve.tokenizer import ChatTemplateError

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"})
PromptInput = str | Sequence[dict[str, Any]] | Sequence[int]
DEFAULT_COMPILE_CACHE = pathlib.Path(os.environ.get("JSERVE_COMPILE_CACHE",
                                                    pathlib.Path.home() / ".cache" / "jserve" / "xla"))


def _content_text(i: int, content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts whose text parts
    are joined (an assistant's ``refusal`` parts count as text); other parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"message {i}: content must be a string, a list of text parts or null")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("text", "refusal"):
            raise InvalidRequestError(f"message {i}: content part {j} has type {kind!r}; this server reads "
                                      f"text parts only (\"type\": \"text\")")
        if not isinstance(part.get(key), str):
            raise InvalidRequestError(f"message {i}: content part {j} needs a string {key!r}")
        texts.append(part[key])
    return "".join(texts)


def normalize_chat(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages checked and made renderable: content as text (None stays None on an
    assistant turn with ``tool_calls``), ``developer`` as ``system``; ``InvalidRequestError`` with
    the message's index for anything else."""
    if not messages:
        raise InvalidRequestError("the chat has no messages")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(f"a chat may have at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"message {i} must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"message {i}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        extra = set(m) - CHAT_FIELDS
        if extra:
            raise InvalidRequestError(f"message {i}: unknown fields {sorted(extra)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise InvalidRequestError(f"message {i}: only assistant messages carry tool_calls")
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise InvalidRequestError(f"message {i}: tool_calls must be a list of {{\"id\", \"type\": "
                                          f"\"function\", \"function\": {{\"name\", \"arguments\"}}}}")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise InvalidRequestError(f"message {i}: a tool message needs the tool_call_id it answers")
        for key in ("name", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise InvalidRequestError(f"message {i}: {key} must be a string")
        msg = {k: v for k, v in m.items() if v is not None}
        if content is None:
            if role != "assistant":
                raise InvalidRequestError(f"message {i}: content is required (null only on an assistant message)")
            msg["content"] = None
        else:
            msg["content"] = _content_text(i, content)
        if role == "developer":
            msg["role"] = "system"
        out.append(msg)
    return out


@dataclasses.dataclass
class Result:
    """A finished request, as ``LLM.generate`` returns it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
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
        finish_reason=last.finish_reason or "error",
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


def load_engine(checkpoint: str | os.PathLike | None = None, *, slots: int = 8, max_len: int = 1024,
                max_prompt_len: int | None = None, quantize: str | None = None, dtype: str = "float32",
                top_logprobs: int = 0, mesh: str | None = None, indivisible: str = "replicate",
                compile_cache: pathlib.Path | None = None, warmup: bool = True,
                speculate: int = 0) -> LoadedModel:
    """Load ``checkpoint`` (default: SmolLM2, converted on first use) into a ``JaxEngine``.

    ``mesh`` (``"tp=4"``, ``"dp=2,tp=4"``) shards the model and the decode state over that many
    devices (see ``jserve.sharding``); ``None`` uses one device, or with several processes
    (``jax.distributed``) ``tp`` over every device of every process. ``speculate``: drafted tokens
    a decode step may check per slot (speculative decoding; 0 = off). ``compile_cache``: as ``LLM``'s.
    """
    import jax
    import jax.numpy as jnp

    from jserve import checkpoint as ckpt
    from jserve import sharding
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.quant import check_mode, weight_bytes, weight_format

    if quantize is not None:
        check_mode(quantize)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    enable_compile_cache(compile_cache)
    path = pathlib.Path(checkpoint) if checkpoint is not None else ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    if mesh is None and jax.process_count() > 1:
        mesh = f"tp={jax.device_count()}"
        log.info("%d processes and no --mesh: using %s over all %d devices", jax.process_count(), mesh,
                 jax.device_count())
    plan = None
    if mesh is not None:
        plan = sharding.plan(sharding.make_mesh(mesh), ckpt.load_config(path), slots, indivisible=indivisible)
        log.info("sharding: %s", plan.describe())
    t0 = time.perf_counter()
    config, params, tokenizer = ckpt.load(path, getattr(jnp, dtype), quantize, plan=plan)
    config = config.for_context(max_len)
    mode = weight_format(params)  # "int8", "q4_1+q8_0", ...; None: all float
    nbytes = weight_bytes(params)
    log.info("loaded %s (%d layers, dim %d, vocab %d; %s weights, %.1f MiB in all) in %.1fs", path,
             config.n_layers, config.dim, config.vocab_size, mode or dtype, nbytes / 2**20, time.perf_counter() - t0)
    engine = JaxEngine(config, params, slots=slots, max_len=max_len, max_prompt_len=max_prompt_len,
                       cache_dtype=getattr(jnp, dtype), top_logprobs=top_logprobs, plan=plan,
                       speculate=speculate)
    seconds = engine.warmup() if warmup else 0.0
    if warmup:
        log.info("warm-up: ready to serve in %.1fs (the other call shapes compile in the background)", seconds)
    return LoadedModel(path, config, tokenizer, engine, mode, nbytes, seconds)


class LLM:
    """A model loaded into a ``JaxEngine`` with an ``Orchestrator`` running continuous batching.

    ``slots``: requests decoded together. ``max_len``: positions per slot (prompt + output).
    ``max_prompt_len``: longest prompt accepted (default ``max_len - 1``). ``quantize``: None
    (as stored: a GGUF's blocks stay blocks), ``"int8"`` (weight-only), ``"int8-dynamic"`` (weights
    and activations), ``"q8_0"``/``"q4_0"``/``"q4_1"`` (block formats) or ``"float"`` (everything
    dequantized to ``dtype``), applied at load.
    ``top_logprobs``: most alternatives a request may ask for (0 disables them, saving a top-k
    per step). ``max_waiting``: bound of the waiting queue. ``mesh``: shard over several
    devices (``"tp=2"``, ``"dp=2,tp=2"``; see ``jserve.sharding``). With several processes
    (``jax.distributed``) the LLM lives on process 0 and the others run ``multihost.follow``.
    ``pipeline``: dispatch each decode step before handling the previous step's tokens (default;
    False alternates host and device, for comparison). ``on_fatal(message)`` is called (on the
    orchestrator's thread) if the engine fails and cannot be rebuilt: every request has then
    ended with an error and new ones are refused. ``max_undelivered``: output pieces a consumer
    may leave unread; past that its request ends (finish reason ``slow_reader``), freeing its slot
    (not ``generate``'s requests: it keeps every piece as it comes).
    ``prefill_budget``: prompt tokens run per decode step while streams are live (rounded down to
    whole chunks of ``engine.chunk``, at least one). ``prefix_cache``: reuse the keys/values of
    prompt prefixes already in some slot (on by default). ``speculate``: speculative decoding
    with prompt-lookup drafts of up to this many tokens per step (0 = off, the default here; see
    ``jserve.speculative``); ``speculate_default``: whether requests that do not say
    (``SamplingParams.speculate`` None) use it. Not with several processes. ``compile_cache``: a
    directory for JAX's persistent compilation cache (``enable_compile_cache``: a process-wide
    ``jax.config`` setting, so off unless given; the server and ``scripts/generate.py`` use
    ``DEFAULT_COMPILE_CACHE``).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, slots: int = 8, max_len: int = 1024,
                 max_prompt_len: int | None = None, quantize: str | None = None, dtype: str = "float32",
                 top_logprobs: int = 0, max_waiting: int = 256, prefill_budget: int = 64,
                 mesh: str | None = None, indivisible: str = "replicate",
                 compile_cache: pathlib.Path | None = None, warmup: bool = True,
                 on_event: Callable[[str, Any, float], None] | None = None, pipeline: bool = True,
                 on_fatal: Callable[[str], None] | None = None, max_undelivered: int = 1024,
                 prefix_cache: bool = True, speculate: int = 0, speculate_default: bool = True):
        import jax

        if jax.process_index() != 0:
            raise RuntimeError("with several processes the LLM runs on process 0; the others run "
                               "jserve.multihost.follow(load_engine(...).engine)")
        if jax.process_count() > 1 and speculate:
            # The leader's engine mirrors no verify to the other processes, whose engines (built by
            # ``load_engine`` with the shared settings) must match this one call for call at warm-up.
            log.info("speculative decoding is off with several processes")
            speculate = 0
        m = load_engine(checkpoint, slots=slots, max_len=max_len, max_prompt_len=max_prompt_len, quantize=quantize,
                        dtype=dtype, top_logprobs=top_logprobs, mesh=mesh, indivisible=indivisible,
                        compile_cache=compile_cache, warmup=warmup, speculate=speculate)
        self.dtype, self.quantize = dtype, m.quantize
        self.checkpoint, self.config, self.tokenizer = m.checkpoint, m.config, m.tokenizer
        self.weight_bytes, self.warmup_seconds = m.weight_bytes, m.warmup_seconds
        self.engine = m.engine
        self._grammars = None  # built on the first constrained request
        if jax.process_count() > 1:
            from jserve.multihost import LeaderEngine

            self.engine = LeaderEngine(m.engine)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_ids
        self.orchestrator = Orchestrator(self.engine, self.tokenizer, eos_token_ids=tuple(eos),
                                         max_waiting=max_waiting, prefill_budget=prefill_budget, on_event=on_event,
                                         pipeline=pipeline, on_fatal=on_fatal, max_undelivered=max_undelivered,
                                         prefix_cache=prefix_cache, speculate=speculate_default)
        _OPEN.add(self)

    # ---- validation at the edge ----------------------------------------------------------
    def prepare(self, prompt: PromptInput, params: SamplingParams) -> list[int]:
        """Token ids for ``prompt`` after checking it and ``params``; ``InvalidRequestError`` if not servable."""
        params.validate(self.config.vocab_size, self.engine.top_logprobs)
        ids = self.tokenize_input(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) > self.engine.max_prompt_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                                      f"{self.engine.max_prompt_len}")
        if len(ids) + params.max_tokens > self.engine.max_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.engine.max_len} tokens; lower max_tokens to at most {self.engine.max_len - len(ids)}")
        return ids

    def _check_text_fits(self, text: str, what: str) -> None:
        """Refuse, before tokenizing it, a text that must hold more tokens than a prompt may: every
        token stands for at most ``max_token_bytes`` bytes, so more bytes than that many tokens'
        worth can never fit (a multi-megabyte prompt is refused at once, not after tokenizing)."""
        tok = self._require_tokenizer()
        limit = self.engine.max_prompt_len * tok.max_token_bytes
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            n = len(text.encode("utf-8", "surrogatepass"))
            raise InvalidRequestError(
                f"{what} has {n} bytes; this server accepts prompts of at most {self.engine.max_prompt_len} tokens, "
                f"which is at most {limit} bytes of text ({tok.max_token_bytes} bytes per token at most)")

    def tokenize_input(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            self._check_text_fits(prompt, "the prompt")
            return self._require_tokenizer().encode(prompt)
        if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
            raise InvalidRequestError(f"a prompt must be text, chat messages or token ids, got {type(prompt).__name__}")
        if prompt and all(isinstance(m, dict) for m in prompt):
            return self.encode_chat(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            v = self.config.vocab_size
            for i, t in enumerate(prompt):
                if not 0 <= t < v:
                    raise InvalidRequestError(f"token id {t} at index {i} is outside the vocabulary [0, {v})")
            return list(prompt)
        raise InvalidRequestError("a list prompt must hold only chat messages (objects) or only token ids (integers)")

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
        """Validate and queue one request; iterate the returned ``Stream`` for its output."""
        params = params or SamplingParams()
        if request_id is not None and len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError(f"request_id may have at most {MAX_REQUEST_ID_CHARS} characters, "
                                      f"got {len(request_id)}")
        return self._submit(prompt, params, Stream(loop), request_id=request_id, timeout=timeout, block=block)

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

    def _submit(self, prompt: PromptInput, params: SamplingParams, stream: Stream, *, request_id: str | None = None,
                timeout: float | None = None, block: bool = False) -> Stream:
        ids = self.prepare(prompt, params)
        matcher = self._matcher(params)
        deadline = time.monotonic() + timeout if timeout is not None else None
        return self.orchestrator.submit(ids, params, stream, request_id=request_id, deadline=deadline,
                                        block=block, matcher=matcher)

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
                 on_finish: Callable[[int, Result | InvalidRequestError], None] | None = None,
                 ) -> list[Result | InvalidRequestError]:
        """Run all prompts through continuous batching; results in input order.

        A prompt that fails validation yields its ``InvalidRequestError`` in its place; the
        others still run. ``on_finish(index, result)`` is called for each, in input order.
        """
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        # Submit from a helper thread (it blocks while the waiting queue is full) and hand results
        # out here in input order, while later prompts still run. Every piece is kept as it comes
        # (``_Collector``): an output waiting for the ones before it is never cut as a slow reader.
        submitted: queue.Queue[_Collector | Exception] = queue.Queue()

        def submit_all() -> None:
            for prompt, p in zip(prompts, plist):
                try:
                    submitted.put(self._submit(prompt, p or SamplingParams(), _Collector(), block=True))
                except Exception as e:  # handed to the caller in this prompt's place
                    submitted.put(e)

        threading.Thread(target=submit_all, name="jserve-submit", daemon=True).start()
        results: list[Result | InvalidRequestError] = []
        for i in range(len(prompts)):
            s = submitted.get()
            if isinstance(s, InvalidRequestError):
                r: Result | InvalidRequestError = s
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
