"""Defects at the edge (issue 24, items 3-6): offline outputs never cut, requests whose client goes
away during submission cancelled, server-sent events under backpressure, and the smaller ones
(a raising sink in the recovery path, HTTP refusals in the metrics, imports, ``jax.config``).

gRPC and HTTP run in this process (on a thread's event loop, over real localhost sockets) so a
test can hold ``LLM.submit`` and watch the server's connections without timing anything."""

from __future__ import annotations

import threading

import pytest

from jserve.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
SLOTS, MAX_LEN, MAX_UNDELIVERED, MAX_WAITING = 2, 1024, 8, 2


class Events:
    """The orchestrator's events (forwarded to ``ServingMetrics``), kept with their requests."""

    def __init__(self):
        from jserve.metrics import ServingMetrics

        self.metrics = ServingMetrics()
        self.finished: list[tuple[str, object]] = []
        self._cv = threading.Condition()

    def __call__(self, kind: str, req, value: float) -> None:
        self.metrics.on_event(kind, req, value)
        if kind.startswith("finished:"):
            with self._cv:
                self.finished.append((kind.split(":", 1)[1], req))
                self._cv.notify_all()

    def wait_finished(self, match, timeout: float = 120.0) -> str:
        """The finish reason of the first request for which ``match(req)`` holds (waits for it)."""
        with self._cv:
            found = self._cv.wait_for(lambda: [r for r, q in self.finished if match(q)], timeout)
        assert found, "the request never finished"
        return found[0]


@pytest.fixture(scope="module")
def events():
    return Events()


@pytest.fixture(scope="module")
def llm(tiny_ckpt, events):
    """Two slots, a small undelivered bound and waiting queue, long outputs possible."""
    from jserve import LLM

    llm = LLM(tiny_ckpt, slots=SLOTS, max_len=MAX_LEN, max_prompt_len=64, top_logprobs=3,
              max_waiting=MAX_WAITING, max_undelivered=MAX_UNDELIVERED, on_event=events)
    yield llm
    llm.close(drain=False)


# ---- 3: offline generation never cuts an output ---------------------------------------------------
def test_generate_returns_every_output_whole_however_long_the_unread_backlog(llm):
    """Six prompts on two slots, each output 40 pieces (5x the undelivered bound): results are read
    in input order while later prompts run, and none may end as a slow reader."""
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    sp = SamplingParams(max_tokens=40, **GREEDY)
    finished = []
    results = llm.generate(prompts, sp, on_finish=lambda i, r: finished.append(i))
    assert [r.finish_reason for r in results] == ["length"] * 6
    assert [r.completion_tokens for r in results] == [40] * 6
    assert [len(r.token_ids) for r in results] == [40] * 6
    assert finished == list(range(6))
    # The same tokens as each prompt alone (nothing lost or repeated in the pieces).
    for prompt, r in zip(prompts, results):
        [alone] = llm.generate([prompt], sp)
        assert r.token_ids == alone.token_ids

