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
