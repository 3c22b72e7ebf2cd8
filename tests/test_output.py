"""A request's output as tokens come: text pieces, stop tokens and strings, max_tokens, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from jserve.engine_api import TokenOut
from jserve.output import ERROR, LENGTH, STOP, Output
from jserve.sampling import SamplingParams
from jserve.tokenizer import TextTokenizer

TOP = 3  # alternatives the engine packs per row in these tests


@pytest.fixture(scope="module")
def tok(real_ckpt):
    return TextTokenizer.load(real_ckpt)


def _row(token: int, logprob: float = -0.5, tops: list[tuple[int, float]] = ()) -> TokenOut:
    ids, lps = np.zeros((TOP,), np.int64), np.zeros((TOP,), np.float32)
    for i, (t, lp) in enumerate(tops):
        ids[i], lps[i] = t, lp
    return TokenOut(token, logprob, ids, lps)


def _run(out: Output, ids: list[int]):
    pieces, reason = [], None
    for t in ids:
        reason, piece = out.add(_row(t))
        pieces.append(piece)
        if reason is not None:
            break
    return pieces, reason


def test_pieces_add_up_to_the_decoded_text_and_count_tokens(tok):
    ids = tok.encode("Hello there, general Kenobi! Ünïcödé and emoji 🙂 too.")
    out = Output(SamplingParams(max_tokens=100), prompt_tokens=7, detok=tok.detokenizer(), top_logprobs=TOP)
    pieces, reason = _run(out, ids)
    assert reason is None and len(pieces) == len(ids)
    assert "".join(p.text for p in pieces) + out.finish(STOP).text == tok.decode(ids)
    assert [p.completion_tokens for p in pieces] == list(range(1, len(ids) + 1))
    assert all(p.prompt_tokens == 7 and p.token_ids == [t] for p, t in zip(pieces, ids))
    assert all(p.logprobs == [] for p in pieces)  # not asked for


def test_a_stop_string_across_tokens_is_cut_and_never_leaks(tok):
    text = "The answer is 42. END of story"
    ids = tok.encode(text)
    out = Output(SamplingParams(max_tokens=100, stop=("END",)), 0, tok.detokenizer())
    pieces, reason = _run(out, ids)
    assert reason == STOP and pieces[-1].finish_reason == STOP
    assert "".join(p.text for p in pieces) == "The answer is 42. "
    # Held back while it could grow into the stop string: no piece ever showed a prefix of it.
    shown = ""
    for p in pieces:
        shown += p.text
        assert "E" not in shown


def test_held_back_text_comes_out_when_the_request_ends_otherwise(tok):
    ids = tok.encode("almost EN")
    out = Output(SamplingParams(max_tokens=100, stop=("END",)), 0, tok.detokenizer())
    pieces, reason = _run(out, ids)
    assert reason is None and "".join(p.text for p in pieces) == "almost "
    last = out.finish("cancelled")
    assert last.text == "EN" and last.finish_reason == "cancelled" and last.token_ids == []
    assert Output(SamplingParams(stop=("x",)), 0, tok.detokenizer()).finish(ERROR, "boom").error == "boom"


def test_eos_ends_without_text_unless_ignored_and_max_tokens_ends_with_length(tok):
    ids = tok.encode("one two three")
    eos = 2
    out = Output(SamplingParams(max_tokens=100), 0, tok.detokenizer(), eos_token_ids=(eos,))
    pieces, reason = _run(out, ids + [eos] + ids)
    assert reason == STOP and pieces[-1].token_ids == [eos] and pieces[-1].completion_tokens == len(ids) + 1
    assert "".join(p.text for p in pieces) == "one two three"
    out = Output(SamplingParams(max_tokens=len(ids) + 2, ignore_eos=True), 0, tok.detokenizer(), eos_token_ids=(eos,))
    pieces, reason = _run(out, ids + [eos] + ids)
    assert reason == LENGTH and len(pieces) == len(ids) + 2
    out = Output(SamplingParams(max_tokens=100, stop_token_ids=(ids[1],)), 0, tok.detokenizer())
    assert _run(out, ids)[1] == STOP and out.generated == 2


def test_logprobs_and_alternatives_come_from_the_row(tok):
    out = Output(SamplingParams(max_tokens=10, logprobs=2), 0, None, top_logprobs=TOP)
    reason, piece = out.add(_row(17, -0.25, [(17, -0.25), (5, -1.5), (9, -3.0)]))
    assert reason is None and piece.text == "" and piece.token_ids == [17]  # no detokenizer: ids only
    assert piece.logprobs == [-0.25] and piece.top_logprobs == [[(17, -0.25), (5, -1.5)]]
    out = Output(SamplingParams(max_tokens=10, logprobs=0), 0, None, top_logprobs=TOP)
    _, piece = out.add(_row(17, -0.25, [(17, -0.25)]))
    assert piece.logprobs == [-0.25] and piece.top_logprobs == []
