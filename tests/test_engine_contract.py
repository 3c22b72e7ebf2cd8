"""Every engine the orchestrator can be given offers every member of the ``Engine`` protocol.

The orchestrator reads the protocol's attributes and calls its methods directly (no duck typing),
so an engine missing one fails only when a server is built on it: the multi-process leader once
lacked ``speculate`` and its server never came up. Checked here without compiling anything."""

from __future__ import annotations

import inspect

import jax
import pytest

from jserve import model
from jserve.config import tiny_config
from jserve.engine import JaxEngine
from jserve.engine_api import Engine
from jserve.multihost import LeaderEngine
from tests.mock_engine import MockEngine


def protocol_members() -> tuple[set[str], set[str]]:
    attrs = set(Engine.__annotations__)
    methods = {name for name, value in vars(Engine).items()
               if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))}
    return attrs - methods, methods


def test_the_protocol_lists_what_the_orchestrator_uses():
    attrs, methods = protocol_members()
    assert {"slots", "max_len", "speculate", "mask_words"} <= attrs
    assert {"extend", "generate", "verify", "release", "ready_widths", "is_ready", "check_prompt"} <= methods


@pytest.fixture(scope="module")
def engine():
    cfg = tiny_config(vocab_size=300)
    return JaxEngine(cfg, model.init_params(cfg, jax.random.key(0)), slots=2, max_len=64, max_prompt_len=32,
                     speculate=4)  # nothing is compiled until a call runs


def test_every_engine_offers_every_member(engine):
    attrs, methods = protocol_members()
    for eng in (engine, MockEngine(speculate=4)):
        missing = [m for m in sorted(attrs | methods) if not hasattr(eng, m)]
        assert not missing, (type(eng).__name__, missing)


def test_the_multi_process_leader_offers_every_member(engine):
    inner = engine
    leader = LeaderEngine(inner)  # one process: its broadcasts return at once
    try:
        attrs, methods = protocol_members()
        missing = [m for m in sorted(attrs | methods) if not hasattr(leader, m)]
        assert not missing, missing
        assert leader.speculate == 0 and leader.ready_widths(1) == ()  # verify is never mirrored
        with pytest.raises(ValueError, match="not supported across several processes"):
            leader.verify(None, [])
        assert leader.mask_words == inner.mask_words and leader.slots == inner.slots
    finally:
        leader.close()


def test_step_calls_return_typed_steps():
    """``extend``, ``generate`` and ``verify`` return ``Step(state, StepResult)`` on every engine
    (read off the annotations for the JAX engines: nothing compiles), and the mock's read back by hand."""
    import numpy as np

    from jserve.engine_api import ChunkRow, DraftRow, Step, StepResult, TokenOut
    from jserve.sampling import SamplingParams

    for cls in (JaxEngine, MockEngine):
        for name in ("extend", "generate", "verify"):
            assert inspect.signature(getattr(cls, name)).return_annotation.split(".")[-1].startswith("Step["), \
                (cls, name)
    eng = MockEngine(speculate=2, top_logprobs=2, vocab_size=64)
    state = eng.begin(eng.init_state(), 0, [5, 6], SamplingParams(), 0)
    out = eng.extend(state, [ChunkRow(0, 0, [5, 6], True)])
    assert isinstance(out, Step) and isinstance(out.result, StepResult)
    [first] = out.result.host().tokens(0)
    assert (first.token, first.logprob, first.top(2)) == (7, -0.25, [(7, -0.25), (8, -1.25)])
    host = eng.verify(out.state, [DraftRow(0, [8, 99])]).result.host()  # 8 accepted, 99 not: 8, then 9
    assert host.verified and host.active(0) and [t.token for t in host.tokens(0)] == [8, 9]
    assert np.asarray(eng.generate(out.state, slots=[1]).result)[0, 2] == 0.0  # an idle slot's row: inactive
    assert isinstance(first, TokenOut)


def test_a_host_result_reads_packed_rows_by_hand():
    import numpy as np

    from jserve.engine_api import HostResult

    # Two rows, 1 alternative: row 0 token 4 (logprob -1, top 4:-1), row 1 inactive.
    flat = HostResult(np.array([[4, -1, 1, 4, -1], [0, 0, 0, 0, 0]], np.float32))
    assert not flat.verified and flat.active(0) and not flat.active(1) and flat.tokens(1) == []
    [t] = flat.tokens(0)
    assert (t.token, t.logprob, t.top(1), t.top(0)) == (4, -1.0, [(4, -1.0)], [])
    # A verify row of width 3 that kept two tokens.
    wide = HostResult(np.array([[[3, -0.5, 1], [8, -2, 1], [0, 0, 0]]], np.float32))
    assert wide.verified and [(t.token, t.logprob) for t in wide.tokens(0)] == [(3, -0.5), (8, -2.0)]
