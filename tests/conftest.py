"""Shared fixtures: a tiny random model (fast) and the real SmolLM2 checkpoint (only where it proves the point)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from jserve import checkpoint
from jserve.config import tiny_config
from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint

DATA = pathlib.Path(__file__).parent / "data"


def pytest_configure(config) -> None:
    # The test session owns its process: JAX's persistent compilation cache on, as the CLIs have it.
    from jserve.llm import DEFAULT_COMPILE_CACHE, enable_compile_cache

    enable_compile_cache(DEFAULT_COMPILE_CACHE)


@pytest.fixture(scope="session")
def real_ckpt() -> pathlib.Path:
    return ensure_default_checkpoint(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((DATA / "reference_smollm2.json").read_text())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, real_ckpt) -> pathlib.Path:
    """A 2-layer random model with the real tokenizer (so text, chat and stop strings work)."""
    tok = checkpoint.load_tokenizer(real_ckpt)
    cfg = tiny_config(vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, bos_token_id=1)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(out, cfg, checkpoint.random_weights(cfg), None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_ckpt / name, out / name)
    return out


# The engine, orchestrator and server tests run once with float weights and once with int8.
QUANT_MODES = [None, "int8"]


@pytest.fixture(scope="session", params=QUANT_MODES, ids=["f32", "int8"])
def tiny_llm(tiny_ckpt, request):
    from jserve import LLM

    llm = LLM(tiny_ckpt, slots=4, max_len=128, max_prompt_len=64, top_logprobs=3, max_waiting=64,
              quantize=request.param)
    yield llm
    llm.close(drain=False)


@pytest.fixture(scope="session")
def real_llm(real_ckpt):
    """With speculative decoding available (the server's default), chosen by its policy; ``events``
    counts the orchestrator's events (``spec_drafted``, ``spec_accepted``, ...)."""
    import collections

    from jserve import LLM

    events = collections.Counter()
    llm = LLM(real_ckpt, slots=4, max_len=128, max_prompt_len=64, speculate=4, dtype="float32",  # as HF's reference
              on_event=lambda kind, req, value: events.update({kind: value}))
    llm.events = events
    llm.engine.wait_ready()  # verify's shapes are compiled in the background
    yield llm
    llm.close(drain=False)
