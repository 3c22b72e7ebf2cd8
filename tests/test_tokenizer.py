"""The GGUF-built tokenizer, chat template and incremental detokenization."""

from __future__ import annotations

import numpy as np
import pytest

from jserve import checkpoint


@pytest.fixture(scope="module")
def tok(real_ckpt):
    return checkpoint.load_tokenizer(real_ckpt)


def test_prompt_ids_equal_hf_tokenizer_and_chat_template(tok, reference):
    for case in reference["cases"]:
        ids = tok.encode_chat(case["messages"]) if "messages" in case else tok.encode(case["prompt"])
        assert ids == case["prompt_ids"], case["id"]


def test_chat_template_adds_default_system_prompt_and_generation_prompt(tok):
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> is one special token, three times


def test_encode_decode_round_trip(tok):
    for text in ["Hello, world!", "  leading spaces\n\ttabs", "Café 東京 🙂 1234567", "<|im_end|> as text"]:
        assert tok.decode(tok.encode(text), skip_special=False) == text


@pytest.mark.parametrize("seed", range(5))
def test_incremental_detokenizer_equals_whole_decode(tok, seed):
    rng = np.random.default_rng(seed)
    ids = tok.encode("Café, naïve, 東京 and emoji 🙂🎉 — ok") + rng.integers(17, tok.vocab_size, 60).tolist()
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids)


def test_incremental_detokenizer_never_emits_a_split_character(tok):
    ids = tok.encode("🙂🎉東京")
    assert len(ids) > 4  # multi-byte characters span several tokens
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == "🙂🎉東京"
    assert "" in pieces  # some tokens held their bytes back until the character was complete


def test_special_tokens_are_skipped_in_output_text(tok):
    ids = tok.encode("Paris.") + [2]
    assert tok.decode(ids) == "Paris."
