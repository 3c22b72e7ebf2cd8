"""The needle test: a request's tokens and logprobs are bitwise the same alone (its prompt computed,
no prefix cache) and amid traffic of any lengths (neighbours near ``max_len`` whose attention reads
many more cache blocks, long prompts chunked into the same calls as the needle's), with its prompt
taken from the prefix cache: its own earlier run's, or a live neighbour's that shares its start."""

from __future__ import annotations

import numpy as np
import pytest

from jserve import SamplingParams
from jserve.llm import collect
from jserve.model import ATTN_BLOCK
from jserve.orchestrator import Orchestrator, Stream

from .waits import wait_steps

MAX_LEN = 3 * ATTN_BLOCK
MAX_PROMPT = MAX_LEN - 64


@pytest.fixture(scope="module", params=[None, "int8-dynamic"], ids=["f32", "int8-dynamic"])
def llm16(tiny_ckpt, request):
    from jserve import LLM

    llm = LLM(tiny_ckpt, slots=16, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT, top_logprobs=3,
              quantize=request.param)
    yield llm
    llm.close(drain=False)


def _fingerprint(r):
    return r.token_ids, np.asarray(r.logprobs, np.float32).tobytes(), r.finish_reason


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_needle_alone_equals_needle_amid_15_random_neighbours(llm16, sampled):
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
