"""Text out of ids equals the tokenizer's own ``decode``, for every kind of tokenizer.

Tokenizers of each kind are built here with ``tokenizers`` (byte-level BPE; SentencePiece-style BPE
with ``<0x..>`` byte fallback, in Llama 2's, Gemma's and Mistral's arrangements; Unigram with and
without byte fallback) beside the real SmolLM2 one. For random and adversarial id sequences the
streamed pieces must join to ``Tokenizer.decode``, characters cut across tokens must never show as
U+FFFD mid-stream, stop strings cut through ``Output`` must equal cutting the decoded text, and
per-token bytes must concatenate to the decoded text.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jserve.detokenize import UNBOUNDED
from jserve.engine_api import TokenOut
from jserve.output import STOP, Output
from jserve.sampling import SamplingParams
from jserve.tokenizer import TextTokenizer, TokenizerConfig, tokenizer_from_gguf

CORPUS = [
    "Hello world, this is a small corpus for training tiny tokenizers.",
    "The quick brown fox jumps over the lazy dog; numbers 12345 and 67890.",
    "Café naïve résumé über straße — accents and dashes.",
    "東京 and 大阪 are cities; ひらがな too.",
    "  leading spaces,\ttabs\nand newlines\n\nagain. END of the story. Stop here.",
    "def f(x):\n    return x * 2  # code too",
] * 20
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
TEXTS = ["Hello world\n", " leading space", "Café 東京 🙂🎉 naïve", "emoji 🙂 split\n\n over bytes",
         "tabs\tand  two  spaces", "日本語のテキスト", "x" * 40, "END of it", "", "\u00e9\u0301 combining"]


def _train_bpe(pre: pre_tokenizers.PreTokenizer, size: int = 400, **trainer: object) -> tuple[dict, list]:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, show_progress=False, **trainer))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in json.loads(t.to_str())["model"]["merges"]]
    return t.get_vocab(), merges


def byte_level_bpe() -> Tokenizer:
    vocab, merges = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab, merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return t


@functools.cache
def _sentencepiece_vocab() -> tuple[dict, list]:
    """Specials, then the 256 byte tokens, then trained ``▁``-marked pieces (Llama 2's layout)."""
    trained, merges = _train_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), size=500)
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def llama2_style() -> Tokenizer:
    """Normalizer Prepend + Replace, no pre-tokenizer; decoder Replace, ByteFallback, Fuse, Strip."""
    vocab, merges = _sentencepiece_vocab()
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.add_special_tokens([AddedToken(s, normalized=False) for s in SPECIALS])
    return t


def gemma_style() -> Tokenizer:
    """Normalizer Replace only; decoder Replace, ByteFallback, Fuse (no leading space removed)."""
    vocab, merges = _sentencepiece_vocab()
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens([AddedToken(s, normalized=False) for s in SPECIALS + ["<start_of_turn>"]])
    return t


def mistral_style() -> Tokenizer:
    """Metaspace pre-tokenizer (prepend first) and a Metaspace decoder after ByteFallback."""
    vocab, merges = _sentencepiece_vocab()
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                               prepend_scheme="first", split=False)])
    t.add_special_tokens([AddedToken(s, normalized=False) for s in SPECIALS + ["[INST]", "[/INST]"]])
    return t


def _unigram(byte_fallback: bool) -> Tokenizer:
    t = Tokenizer(models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIALS, unk_token="<unk>",
                                                          show_progress=False))
    if byte_fallback:  # rebuild with byte tokens and the byte_fallback flag
        spec = json.loads(t.to_str())
        pieces = [(p, s) for p, s in spec["model"]["vocab"]]
        pieces[3:3] = [(b, 0.0) for b in BYTE_TOKENS]
        model = models.Unigram(pieces, unk_id=0, byte_fallback=True)
        t2 = Tokenizer(model)
        t2.pre_tokenizer = pre_tokenizers.Metaspace()
        t2.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        t2.add_special_tokens(SPECIALS)
        return t2
    t.decoder = decoders.Metaspace()
    return t


def unigram() -> Tokenizer:
    return _unigram(False)


def unigram_byte_fallback() -> Tokenizer:
    return _unigram(True)


BUILDERS = [byte_level_bpe, llama2_style, gemma_style, mistral_style, unigram, unigram_byte_fallback]


def _text_tokenizer(t: Tokenizer) -> TextTokenizer:
    return TextTokenizer(t, TokenizerConfig(bos_token_id=None, eos_token_ids=(), chat_template=None))


@pytest.fixture(scope="module", params=BUILDERS + ["smollm2"], ids=[b.__name__ for b in BUILDERS] + ["smollm2"])
def tok(request, real_ckpt) -> TextTokenizer:
    if request.param == "smollm2":
        return TextTokenizer.load(real_ckpt)
    return _text_tokenizer(request.param())


def _stream(tok: TextTokenizer, ids: list[int], skip: bool = True) -> list[str]:
    d = tok.detokenizer(skip)
    return [d.add(i) for i in ids] + [d.flush()]


def _id_sequences(tok: TextTokenizer, seed: int) -> list[list[int]]:
    """Encoded texts, random ids, runs of byte tokens (emoji cut over them, invalid UTF-8), specials
    between bytes, lone ``▁`` pieces."""
    rng = np.random.default_rng(seed)
    v = tok.vocab_size
    seqs = [tok.tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    seqs += [rng.integers(0, v, int(rng.integers(1, 40))).tolist() for _ in range(20)]
    byte_ids = [tok.tok.token_to_id(b) for b in BYTE_TOKENS]
    specials = sorted(tok.special_ids)
    if all(i is not None for i in byte_ids):
        emoji = [byte_ids[b] for b in "🙂🎉".encode()]
        seqs += [emoji, emoji[:-1], emoji[1:], [byte_ids[0xFF], *emoji], emoji[:2] + specials[:1] + emoji[2:]]
        seqs += [rng.choice(byte_ids, int(rng.integers(1, 12))).tolist() for _ in range(10)]
    for piece in ("▁", "▁▁", " ", "Ġ"):
        i = tok.tok.token_to_id(piece)
        if i is not None:
            seqs += [[i, i, *seqs[0]], [*seqs[0], i], [i]]
    if specials:
        seqs += [[specials[0], *seqs[2], specials[-1], *seqs[1]], [specials[-1]] * 3]
    return [s for s in seqs if s]


@pytest.mark.parametrize("seed", range(3))
def test_streamed_pieces_join_to_the_tokenizers_own_decode(tok, seed):
    for ids in _id_sequences(tok, seed):
        for skip in (True, False):
            assert "".join(_stream(tok, ids, skip)) == tok.tok.decode(ids, skip_special_tokens=skip), (ids, skip)
        assert tok.decode(ids) == tok.tok.decode(ids, skip_special_tokens=True)


def test_characters_cut_across_tokens_never_show_as_replacement_mid_stream(tok):
    held_back = 0
    for text in TEXTS:
        ids = tok.tok.encode(text, add_special_tokens=False).ids
        pieces = _stream(tok, ids)
        assert all("\ufffd" not in p for p in pieces), (text, pieces)
        held_back += pieces[:-1].count("")
    if tok.tok.token_to_id("<0xF0>") is not None or "ByteLevel" in str(tok.tok.decoder):
        assert held_back > 0  # the emoji's bytes span tokens: some tokens held their text back


def test_sentencepiece_text_is_decoded_text_not_pieces():
    tok = _text_tokenizer(llama2_style())
    ids = tok.encode("Hello world\n🙂")
    assert [tok.tok.id_to_token(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tok.decode(ids) == "Hello world\n🙂" == "".join(_stream(tok, ids))
    assert tok.token_bytes(tok.tok.token_to_id("<0xF0>")) == b"\xf0"
    assert tok.token_bytes(tok.tok.token_to_id("▁Hello")) == b" Hello"


@pytest.mark.parametrize("seed", range(3))
def test_token_bytes_concatenate_to_the_decoded_text(tok, seed):
    """Per-token bytes (logprobs' token text) are each token's mid-text bytes: after a plain context
    token they concatenate to what ``decode`` gives for the whole sequence."""
    ctx = tok.tok.encode("x", add_special_tokens=False).ids[-1:]
    head = tok.tok.decode(ctx)
    for ids in _id_sequences(tok, seed):
        whole = tok.tok.decode(ctx + ids, skip_special_tokens=True)
        if "\ufffd" in whole:  # a byte-fallback decoder replaces a whole bad run, not its bad bytes
            continue
        joined = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", "replace")
        assert head + joined == whole, ids


def test_every_tokens_bytes_are_what_decode_gives_after_a_context_token(tok):
    ctx = tok.tok.encode("x", add_special_tokens=False).ids[-1:]
    head = tok.tok.decode(ctx)
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i, skip_special=False)
        text = tok.tok.decode(ctx + [i], skip_special_tokens=False)
        try:
            assert head + b.decode("utf-8") == text, i
        except UnicodeDecodeError:  # part of a character: the decoder shows replacement characters
            assert text.startswith(head) and "\ufffd" in text, i
        if i in tok.special_ids:
            assert tok.token_bytes(i) == b"" and tok.token_bytes(i, skip_special=False)
    assert tok.token_bytes(tok.vocab_size) == tok.token_bytes(-1) == b""


def test_structured_output_reads_each_kind_of_tokenizer_as_its_text(tok):
    """llguidance (structured output) sees each token as the text it decodes to: a constraint
    accepts exactly the tokens of a matching text, and its mask allows them and forbids others."""
    from jserve.structured import Constraint, Grammars, fill_mask

    grammars = Grammars(tok, tok.vocab_size, (2,))
    # A SentencePiece text's first token starts with "▁": mid-text, that is a space.
    ids = tok.tok.encode("café says hello\n", add_special_tokens=False).ids
    m = grammars.matcher(Constraint("regex", r" ?café says [a-z]+\n"))
    mask = np.zeros((grammars.words,), np.int32)
    for i in ids:
        fill_mask(m, mask)
        assert (mask[i // 32] >> (i % 32)) & 1, tok.tok.id_to_token(i)
        assert m.consume_token(i) and not m.is_error()
    assert m.is_accepting()
    m = grammars.matcher(Constraint("regex", "[0-9]+"))
    fill_mask(m, mask)
    letter = tok.tok.encode("x", add_special_tokens=False).ids[-1]
    assert not (mask[letter // 32] >> (letter % 32)) & 1


def _row(token: int) -> TokenOut:
    return TokenOut(token, 0.0, np.zeros((0,), np.int64), np.zeros((0,), np.float32))


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_cut_through_output_equal_cutting_the_decoded_text(tok, seed):
    rng = np.random.default_rng(seed)
    for ids in _id_sequences(tok, seed):
        text = tok.decode(ids)
        if not text:
            continue
        a = int(rng.integers(0, len(text)))
        stops = (text[a:a + int(rng.integers(1, 5))], "never-in-the-text-\x00")
        if "\ufffd" in stops[0]:  # bytes that never form a character show only when the stream ends
            continue
        # Ends by length at the last id, as a request does (held-back bytes come out then).
        out = Output(SamplingParams(max_tokens=len(ids), stop=stops), 0, tok.detokenizer())
        shown, reason = "", None
        for t in ids:
            reason, piece = out.add(_row(t))
            shown += piece.text
            assert stops[0] not in shown
            if reason is not None:
                break
        assert reason == STOP
        assert shown == text[:text.find(stops[0])], (ids, stops)


def test_max_token_bytes_bounds_the_bytes_of_text_per_token(tok):
    bound = tok.max_token_bytes
    rng = np.random.default_rng(0)
    texts = TEXTS + ["▁" * 50, " " * 50, "\n" * 30, "🙂" * 20, "Hello world " * 10]
    texts += [tok.decode(rng.integers(0, tok.vocab_size, 30).tolist(), skip_special=False) for _ in range(20)]
    for text in texts:
        n = len(tok.tok.encode(text, add_special_tokens=False).ids)
        assert len(text.encode("utf-8")) <= n * bound, (text, bound)
    assert bound < UNBOUNDED or tok.tok.model.__class__.__name__ == "Unigram"


def test_max_token_bytes_is_unbounded_where_unknowns_fuse():
    tok = _text_tokenizer(unigram())
    text = "\u2603" * 100  # snowmen: not in the vocabulary, all one fused unknown token
    assert len(tok.tok.encode(text).ids) <= 2
    assert tok.max_token_bytes == UNBOUNDED


def test_gguf_byte_level_tokenizer_still_decodes_as_the_hf_one(real_ckpt, reference):
    """A byte-level GGUF vocabulary (the SmolLM2 one, as ``tokenizer.ggml.*`` fields) builds a
    tokenizer that encodes as the Hugging Face tokenizer did (the reference ids) and streams text
    equal to its ``decode``. (Reading the GGUF file itself is ``test_convert``'s, and slow.)"""
    spec = json.loads((real_ckpt / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for t in spec["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = sorted(vocab, key=vocab.get)
    control = {t["id"] for t in spec["added_tokens"] if t["special"]}
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [3 if i in control else 1 for i in range(len(tokens))],
              "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = TextTokenizer(*tokenizer_from_gguf(fields))
    for case in reference["cases"]:
        if "prompt" in case:
            assert tok.encode(case["prompt"]) == case["prompt_ids"], case["id"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert "".join(_stream(tok, ids)) == tok.tok.decode(ids) == text
    assert tok.max_token_bytes == TextTokenizer.load(real_ckpt).max_token_bytes == 81


def test_sentencepiece_gguf_vocabulary_builds_a_byte_fallback_tokenizer():
    """A llama-style GGUF vocabulary (pieces, scores by merge rank, token types) gives the tokenizer
    Llama 2's ``tokenizer.json`` arrangement gives for the same vocabulary and merges: the same ids
    for every text, text decoded (not pieces), control tokens special, BOS added."""
    vocab, _ = _sentencepiece_vocab()
    tokens = list(vocab)
    types = [3 if t in ("<s>", "</s>") else 2 if t == "<unk>" else 6 if t in BYTE_TOKENS else 1 for t in tokens]
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.scores": [0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": "{{ messages[0]['content'] }}"}
    t, cfg = tokenizer_from_gguf(fields)
    tok, ref = TextTokenizer(t, cfg), llama2_style()
    assert cfg.add_bos_token and tok.special_ids >= {1, 2} and tok.has_chat_template
    for text in TEXTS + CORPUS[:6]:
        ids = tok.encode(text)
        assert ids == [1, *ref.encode(text, add_special_tokens=False).ids]
        assert tok.decode(ids) == text == "".join(_stream(tok, ids))
