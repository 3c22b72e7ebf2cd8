"""The real SmolLM2 checkpoint against Hugging Face transformers (fixture from scripts/make_reference.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jserve import SamplingParams, blocks, checkpoint, model

TINY_MARGIN = 1e-2  # where HF's top-2 logits are this close, float rounding may pick either
# First-step logits against HF: float32 products agree to ~5e-5 over 30 layers. The CPU kernels (where
# built) quantize activations per 32-value block to int16 for the Q4_1/Q8_0 weights (csrc/kernels.h,
# steps of 1/65534 of each block's max): measured 7.6e-3 at most on these logits (~25), so 2e-2 there;
# an actual modelling error (norm eps, RoPE order, a missing scale) moves logits by > 0.1 either way.
LOGIT_TOL = 2e-2 if blocks._kernels() is not None else 1e-3


def _comparable_prefix(case) -> int:
    """Greedy tokens to compare: all, or up to the first step whose top-2 margin is tiny."""
    for i, m in enumerate(case["top2_margins"]):
        if m < TINY_MARGIN:
            return i + 1  # the token at i itself may differ; compare it anyway only if margin allows
    return len(case["greedy_ids"])


def test_fixture_margins_allow_full_comparison(reference):
    # Report: every fixture step has a clear winner, so all 32 tokens are compared.
    assert all(_comparable_prefix(c) == len(c["greedy_ids"]) for c in reference["cases"])


def _extend_logits(params, cfg, ids: list[int]) -> np.ndarray:
    """The serving path: the prompt run into slot 1 of a cache in chunks of 16 (two rows per call)."""
    from jserve.kv_cache import KVCache

    ext = jax.jit(model.extend, static_argnums=1)
    cache = KVCache.zeros(cfg, 2, 128, np.float32)
    chunks = [(a, ids[a:a + 16]) for a in range(0, len(ids), 16)]
    for i in range(0, len(chunks), 2):
        call = chunks[i:i + 2]
        tok, st, ct = np.zeros((2, 16), np.int32), np.zeros(2, np.int32), np.zeros(2, np.int32)
        for r, (a, c) in enumerate(call):
            tok[r, :len(c)], st[r], ct[r] = c, a, len(c)
        x, cache = ext(params, cfg, tok, np.ones(2, np.int32), st, ct, cache, np.int32(1))
    r = len(call) - 1
    return np.asarray(model.unembed(params, cfg, x[r, ct[r] - 1]))


@pytest.mark.parametrize("path", ["prefill", "extend"])
def test_first_step_logits_match_hf(real_ckpt, reference, path):
    """Tolerance LOGIT_TOL (above). ``prefill`` is the whole-prompt forward; ``extend`` the chunked
    path serving uses."""
    cfg, params, _ = checkpoint.load(real_ckpt)
    prefill = jax.jit(model.prefill, static_argnums=1)
    for case in reference["cases"]:
        ids = case["prompt_ids"]
        if path == "extend":
            logits = _extend_logits(params, cfg, ids).astype(np.float64)
        else:
            padded = np.zeros(64, np.int32)
            padded[: len(ids)] = ids
            logits, _, _ = prefill(params, cfg, padded[None], np.array([len(ids)]))
            logits = np.asarray(logits)[0].astype(np.float64)
        top = case["first_step_top"]
        np.testing.assert_allclose(logits[top["ids"]], top["logits"], atol=LOGIT_TOL, err_msg=case["id"])
        lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        assert abs(lse - top["logsumexp"]) < LOGIT_TOL, case["id"]
        assert int(np.argmax(logits)) == top["ids"][0]


def test_greedy_through_engine_equals_hf(real_llm, reference):
    """All fixture prompts at once through 4 slots (continuous batching), 32 greedy tokens each."""
    cases = reference["cases"]
    n = len(cases[0]["greedy_ids"])
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    results = real_llm.generate([c["prompt_ids"] for c in cases], params)
    for case, r in zip(cases, results):
        k = _comparable_prefix(case)
        assert r.token_ids[:k] == case["greedy_ids"][:k], case["id"]
        assert r.finish_reason == "length" and r.completion_tokens == n


def test_speculative_greedy_equals_hf(real_llm, reference):
    """Every fixture prompt alone, each decode step checking prompt-lookup drafts: the same 32 tokens
    as HF, and on the input-grounded prompts most tokens come from kept drafts."""
    from tests.test_speculative import AlwaysVerify

    cases = reference["cases"]
    n = len(cases[0]["greedy_ids"])
    orch = real_llm.orchestrator
    policy, orch.policy = orch.policy, AlwaysVerify()
    try:
        for case in cases:
            before = real_llm.events["spec_accepted"]
            [r] = real_llm.generate([case["prompt_ids"]],
                                    SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, speculate=True))
            k = _comparable_prefix(case)
            assert r.token_ids[:k] == case["greedy_ids"][:k], case["id"]
            if case["id"].startswith("grounded"):
                assert real_llm.events["spec_accepted"] - before >= n // 2, case["id"]
    finally:
        orch.policy = policy


def test_capital_of_france_answers_paris(real_llm, reference):
    case = next(c for c in reference["cases"] if c["id"] == "capital")
    [r] = real_llm.generate([case["messages"]], SamplingParams(temperature=0.0, max_tokens=32))
    assert "Paris" in r.text
    assert r.finish_reason == "stop"  # <|im_end|>
    assert r.token_ids == case["greedy_ids"][: len(r.token_ids)]
    assert r.token_ids[-1] == 2
