"""The needle test: a request's tokens and logprobs are bitwise the same alone (its prompt computed,
no prefix cache) and amid traffic of any lengths (neighbours near ``max_len`` whose attention reads
many more cache blocks, long prompts chunked into the same calls as the needle's), with its prompt
taken from the prefix cache: its own earlier run's, or a live neighbour's that shares its start."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from jserve import SamplingParams
from jserve.llm import collect
from jserve.model import ATTN_BLOCK
from jserve.orchestrator import Orchestrator, Stream
from jserve.speculative import SpecPolicy

from .waits import wait_steps

MAX_LEN = 3 * ATTN_BLOCK
MAX_PROMPT = MAX_LEN - 64


@pytest.fixture(scope="module", params=[(None, "bfloat16"), ("int8-dynamic", "bfloat16"), (None, "int8")],
                ids=["f32", "int8-dynamic", "kv-int8"])
def llm16(tiny_ckpt, request):
    """Float weights, int8-dynamic weights and activations, float weights with an int8 KV cache."""
    from jserve import LLM

    quantize, kv_dtype = request.param
    # float32 weights on a device too (its default is bfloat16)
    llm = LLM(tiny_ckpt, slots=16, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT, top_logprobs=3,
              quantize=quantize, kv_dtype=kv_dtype, dtype="float32")
    yield llm
    llm.close(drain=False)


def _fingerprint(r):
    return r.token_ids, np.asarray(r.logprobs, np.float32).tobytes(), r.finish_reason


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_needle_alone_equals_needle_amid_15_random_neighbours(llm16, sampled):
    if sampled and np.dtype(llm16.engine.cache_dtype) == np.int8:
        pytest.skip("an int8 cache rounds keys the same whatever samples from them: greedy covers it, in half the time")
    if sampled and llm16.quantize is not None:  # the weights as loaded: None when all float
        # Greedy's fingerprint holds every logprob's bits: the logits are row-invariant with these weights.
        # What sampling adds (top-k / top-p / the seeded draw over those logits) is the sampler's, the same
        # code whatever the weights: float weights' seeded run covers it.
        pytest.skip("the sampler is the same over quantized weights' logits: float weights' seeded run covers it")
    rng = np.random.default_rng(7 + sampled)
    vocab = llm16.config.vocab_size
    needle_prompt = rng.integers(17, vocab, 21).tolist()
    needle_params = SamplingParams(max_tokens=48, ignore_eos=True, logprobs=3,
                                   **(dict(temperature=0.9, top_p=0.95, top_k=40, seed=1234) if sampled
                                      else dict(temperature=0.0)))
    cold = Orchestrator(llm16.engine, llm16.tokenizer, prefix_cache=False)
    try:
        alone = collect(list(cold.submit(needle_prompt, needle_params, Stream())))
    finally:
        cold.shutdown(drain=False, timeout=10)
    assert alone.finish_reason == "length" and len(alone.logprobs) == 48 and alone.cached_tokens == 0
    cached = []
    for trial in range(3):
        # A neighbour that starts like the needle: the needle may copy its prefix from that slot.
        sharer = needle_prompt[:16] + rng.integers(17, vocab, int(rng.integers(1, 60))).tolist()
        others = [(sharer, SamplingParams(max_tokens=30, ignore_eos=True))]
        for _ in range(14):
            n = int(rng.choice([rng.integers(1, 40), rng.integers(MAX_PROMPT - 40, MAX_PROMPT + 1)]))
            room = MAX_LEN - n
            params = SamplingParams(max_tokens=int(rng.integers(max(1, room - 10), room + 1)), ignore_eos=True,
                                    temperature=float(rng.choice([0.0, 1.0])), seed=int(rng.integers(1 << 30)),
                                    top_p=float(rng.choice([1.0, 0.9])), logprobs=[None, 0, 2][rng.integers(3)])
            others.append((rng.integers(17, vocab, n).tolist(), params))
        at = int(rng.integers(0, 16))
        order = others[:at] + [(needle_prompt, needle_params)] + others[at:]
        streams = []
        for prompt, params in order:
            streams.append(llm16.submit(prompt, params, block=True))
            wait_steps(llm16.orchestrator, int(rng.integers(0, 3)))  # arrivals 0-2 decode steps apart
        results = [collect(list(s)) for s in streams]
        assert _fingerprint(results[at]) == _fingerprint(alone), f"trial {trial}: the needle changed at {at}"
        cached.append(results[at].cached_tokens)
        assert any(len(p) + r.completion_tokens > MAX_LEN - 16 for (p, _), r in zip(order, results))
    assert llm16.orchestrator.slots_in_use == 0
    assert any(cached), "the needle never took its prefix from the cache: that path went untested"


class _AlwaysVerify(SpecPolicy):
    """Every step checks drafts (the real policy picks by measured speed, which a test can't fix)."""

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        return True

    def choose(self, live: int, rows_bucket: int, options: dict[int, float]) -> int:
        return max(options)


@pytest.fixture(scope="module")
def spec16(tiny_ckpt):
    """16 slots, float weights, speculation on and every step verifying drafts."""
    from jserve import LLM

    events = collections.Counter()

    def on_event(kind, req, value):
        if kind.startswith("spec_"):
            events[kind] += value

    llm = LLM(tiny_ckpt, slots=16, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT, top_logprobs=3, speculate=4,
              on_event=on_event, dtype="float32")
    llm.events = events
    if not llm.engine.row_invariant:
        llm.close(drain=False)
        pytest.skip("the CPU kernels are not built here: verify equals plain decoding only at fixed shapes")
    llm.engine.wait_ready()
    llm.orchestrator.policy = _AlwaysVerify()
    yield llm
    llm.close(drain=False)


def _low_occupancy(llm, speculate: bool, policy=None) -> None:
    """The needle alone, then beside one or two random neighbours (one to three live slots of 16),
    arriving before, with or after it: the same tokens and logprob bits."""
    rng = np.random.default_rng(11 + speculate)
    vocab = llm.config.vocab_size
    motif = rng.integers(17, vocab, 6).tolist()
    needle_prompt = motif * 4 + rng.integers(17, vocab, 3).tolist() + motif  # drafts find continuations
    needle_params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=3, temperature=0.9, top_p=0.95,
                                   seed=4321, speculate=speculate)
    cold = Orchestrator(llm.engine, llm.tokenizer, prefix_cache=False)
    if policy is not None:
        cold.policy = policy
    try:
        alone = collect(list(cold.submit(needle_prompt, needle_params, Stream())))
    finally:
        cold.shutdown(drain=False, timeout=10)
    assert len(alone.logprobs) == 40
    for trial in range(3):
        others = [(rng.integers(17, vocab, int(rng.integers(1, 70))).tolist(),
                   SamplingParams(max_tokens=int(rng.integers(3, 60)), ignore_eos=True, seed=int(rng.integers(1 << 30)),
                                  temperature=float(rng.choice([0.0, 1.0])), logprobs=[None, 2][rng.integers(2)],
                                  speculate=bool(rng.integers(2)) and speculate))
                  for _ in range(trial % 2 + 1)]
        at = int(rng.integers(0, len(others) + 1))
        order = others[:at] + [(needle_prompt, needle_params)] + others[at:]
        streams = []
        for prompt, params in order:
            streams.append(llm.submit(prompt, params, block=True))
            wait_steps(llm.orchestrator, int(rng.integers(0, 4)))
        results = [collect(list(s)) for s in streams]
        assert _fingerprint(results[at]) == _fingerprint(alone), f"trial {trial}: the needle changed at {at}"
    assert llm.orchestrator.slots_in_use == 0


def test_needle_alone_equals_needle_beside_one_or_two_neighbours(llm16):
    _low_occupancy(llm16, speculate=False)


def test_speculating_needle_alone_equals_needle_beside_one_or_two_neighbours(spec16):
    _low_occupancy(spec16, speculate=True, policy=_AlwaysVerify())
    assert spec16.events["spec_accepted"] > 0  # drafts were checked by verify, and some kept
