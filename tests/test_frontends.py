"""One request, four front ends: gRPC (the client stub), HTTP (httpx, OpenAI's bodies), the Python
``LLM`` and ``scripts/generate.py``'s JSONL lines give the same tokens, the same finish reason and
the same error message, because each only maps fields onto ``jserve.request``.

One LLM serves all four (gRPC and HTTP in-process on one event loop, as ``jserve.server`` runs
them), so the model compiles once for the module."""

from __future__ import annotations

import grpc
import pytest

from jserve.errors import ErrorKind
from jserve.request import ERRORS, FINISHES, FinishReason
from jserve.serving_config import EngineConfig

from .frontends import Frontends, load_generate_script

SLOTS, MAX_LEN, MAX_PROMPT = 4, 128, 64
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fronts(tiny_ckpt):
    from jserve import LLM

    llm = LLM(tiny_ckpt, engine=EngineConfig(slots=SLOTS, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT,
                                             top_logprobs=3))
    f = Frontends(llm)
    yield f
    f.close()
    llm.close(drain=False)


VALID = [
    ("text", "Once upon a time", dict(temperature=0.0, max_tokens=12, ignore_eos=True)),
    ("chat", CHAT, dict(temperature=0.0, max_tokens=10, ignore_eos=True, stop=["\n\n"])),
    # max_tokens not given: the one default, the rest of the context (MAX_LEN - 4 prompt tokens).
    ("ids_default_max_tokens", [5, 900, 12000, 77], dict(temperature=0.0, ignore_eos=True)),
    ("seeded", [7, 8, 9], dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=9)),
]


@pytest.mark.parametrize("name, prompt, fields", VALID, ids=[v[0] for v in VALID])
def test_every_front_end_gives_the_same_tokens_and_finish_reason(fronts, name, prompt, fields):
    ids, text, reason, n = fronts.llm_answer(prompt, fields)
    assert n == len(ids) and n >= 1
    if "max_tokens" in fields:
        assert n <= fields["max_tokens"]
    else:
        assert n == MAX_LEN - len(prompt) and reason == FinishReason.LENGTH  # ignore_eos: to the context's end
    assert fronts.script_answer(prompt, fields) == (ids, text, reason, n)
    assert fronts.grpc_answer(prompt, fields) == (ids, reason, n)
    assert fronts.http_answer(prompt, fields) == (text, FINISHES[reason].openai, n)


def _context_message(prompt_tokens: int, max_tokens: int) -> str:
    return (f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of {MAX_LEN} tokens; "
            f"lower max_tokens to at most {MAX_LEN - prompt_tokens}")


INVALID = [
    ("empty_prompt", "", {}, "the prompt is empty"),
    ("empty_ids", [], {}, "the prompt is empty"),
    ("max_tokens_past_the_context", [5, 6, 7], dict(max_tokens=MAX_LEN), _context_message(3, MAX_LEN)),
    ("max_tokens_zero", "hello", dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    ("negative_temperature", "hello", dict(temperature=-0.5),
     "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    ("top_p_negative", "hello", dict(top_p=-0.5), "top_p must be in [0, 1] (0 = the most likely token only), got -0.5"),
    ("token_outside_vocabulary", [1, 2, 49152], {}, "token id 49152 at index 2 is outside the vocabulary [0, 49152)"),
    ("unknown_role", [{"role": "wizard", "content": "hi"}], {},
     "message 0: unknown role 'wizard' (expected one of system, developer, user, assistant, tool)"),
    ("too_many_stops", "hello", dict(stop=["a", "b"] * 9), "at most 16 stop strings are accepted, got 18"),
    ("prompt_too_long", list(range(20, 21 + MAX_PROMPT)), {},
     f"the prompt has {MAX_PROMPT + 1} tokens; this server accepts at most {MAX_PROMPT}"),
]


@pytest.mark.parametrize("name, prompt, fields, message", INVALID, ids=[v[0] for v in INVALID])
def test_every_front_end_refuses_with_the_same_message(fronts, name, prompt, fields, message):
    edge = ERRORS[ErrorKind.INVALID]
    assert fronts.llm_answer(prompt, fields) == ("error", ErrorKind.INVALID, message)
    assert fronts.script_answer(prompt, fields) == ("error", message)
    assert fronts.grpc_answer(prompt, fields) == ("error", grpc.StatusCode[edge.grpc], message)
    assert fronts.http_answer(prompt, fields) == ("error", edge.http, message, edge.openai_type)


def test_a_stop_of_the_wrong_type_is_refused_alike_where_the_protocol_can_carry_it(fronts):
    message = "stop[0] must be a string, got an integer: 1"
    fields = dict(stop=[1])
    assert fronts.llm_answer("hello", fields) == ("error", ErrorKind.INVALID, message)
    assert fronts.script_answer("hello", fields) == ("error", message)
    assert fronts.http_answer("hello", fields) == ("error", 400, message, "invalid_request_error")
    with pytest.raises(TypeError):  # gRPC's stop is `repeated string`: the stub cannot send it
        fronts.grpc_answer("hello", fields)


def test_the_server_the_llm_and_the_script_share_one_set_of_defaults():
    import dataclasses

    from jserve.sampling import SamplingParams
    from jserve.server import build_parser, engine_config, scheduler_config
    from jserve.serving_config import SchedulerConfig

    args = build_parser().parse_args([])
    assert engine_config(args) == EngineConfig() and scheduler_config(args) == SchedulerConfig()
    script = load_generate_script().build_parser().parse_args(["--input", "-", "--output", "-"])
    for field in ("slots", "max_len", "max_prompt_len", "dtype", "quantize", "speculate"):
        assert getattr(script, field) == getattr(EngineConfig(), field), field
    assert SamplingParams().max_tokens is None  # the rest of the context, for every front end
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert defaults["speculate"] == 0 and defaults["top_logprobs"] == 5
