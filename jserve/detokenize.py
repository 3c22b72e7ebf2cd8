"""Text out of token ids, as the tokenizer's own decoder gives it, whatever kind it is.

Byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen), SentencePiece-style BPE (Metaspace ``▁`` plus
``<0x..>`` byte-fallback tokens: Llama 2, Mistral v0.x, Gemma, Phi-3), Unigram and WordPiece each
turn ids into text differently, so nothing here assumes a byte table: streamed text comes from
``tokenizers.decoders.DecodeStream`` (which decodes a short window of recent ids and hands out what
it adds), per-token text from the tokenizer's ``decode`` of the token after a context token.

- ``IncrementalDetokenizer``: one request's ids in, text pieces out; the pieces (plus ``flush``)
  join to ``Tokenizer.decode(ids)``, and a character cut across tokens is held back until complete.
- ``TokenBytes``: the bytes each id stands for in the middle of a text (for logprobs).
- ``max_input_bytes_per_token``: how many bytes of input text one token can cover, read from the
  tokenizer's normalizer, pre-tokenizer, model and vocabulary (a bound for refusing prompts early).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from tokenizers import Tokenizer, models
from tokenizers.decoders import DecodeStream

# A token can cover an unbounded stretch of input (a normalizer that drops or collapses text, a
# pre-tokenizer that drops whitespace, unknown characters fused into one token, an added token that
# swallows the whitespace beside it): no byte bound exists, so none is claimed.
UNBOUNDED = 1 << 40

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Normalizers that may shorten text, by at most this factor in UTF-8 bytes (composition and
# compatibility mappings: three conjoining jamo to one syllable, KELVIN SIGN to "k").
_UNICODE_NORMALIZERS = {"NFC": 3, "NFD": 3, "NFKC": 3, "NFKD": 3, "Lowercase": 3}
# Pre-tokenizers that only split (keep every character of their input).
_SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "FixedLength"}


def _gpt2_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _components(node: dict[str, Any] | None, key: str) -> Iterator[dict[str, Any]]:
    """The parts of a ``tokenizer.json`` normalizer / pre-tokenizer / decoder, Sequences flattened."""
    if not node:
        return
    if node.get("type") == "Sequence":
        for child in node.get(key, []):
            yield from _components(child, key)
    else:
        yield node


def _spec(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer's ``tokenizer.json`` parts that say how it treats text (not the vocabulary)."""
    spec = {}
    for name in ("normalizer", "pre_tokenizer", "decoder"):
        part = getattr(tok, name)
        spec[name] = json.loads(part.__getstate__()) if part is not None else None
    model = tok.model
    if isinstance(model, models.BPE):
        spec["model"] = {"type": "BPE", "unk_token": model.unk_token, "fuse_unk": model.fuse_unk,
                         "byte_fallback": model.byte_fallback}
    else:
        spec["model"] = {k: v for k, v in json.loads(model.__getstate__()).items() if k != "vocab"}
    return spec


def _decoder_types(spec: dict[str, Any]) -> set[str]:
    return {d.get("type") for d in _components(spec.get("decoder"), "decoders")}


def _context_id(tok: Tokenizer) -> int | None:
    """A plain one-letter token to decode others after, so each shows its mid-text form (a leading
    ``▁`` becomes a space, not stripped as at the start of a text)."""
    for ch in "aeoxtnsAEOX":
        for piece in (ch, "▁" + ch, "Ġ" + ch):
            i = tok.token_to_id(piece)
            if i is not None and tok.decode([i, i]) == tok.decode([i]) * 2:
                return i
    return None


class TokenBytes:
    """The bytes each id stands for in the middle of a text, special tokens as their text, worked
    out per id on first asking (a few microseconds) and kept.

    Byte-level tokens give the bytes they map to and ``<0x..>`` byte-fallback tokens their byte
    (either may be part of a character); every other token gives the UTF-8 of what the tokenizer's
    ``decode`` adds for it after a context token. Ids outside the vocabulary give ``b""``."""

    def __init__(self, tok: Tokenizer):
        decoders = _decoder_types(_spec(tok))
        self._tok = tok
        self._byte_of = _gpt2_chars().__getitem__ if "ByteLevel" in decoders else None
        self._byte_fallback = "ByteFallback" in decoders
        self._added = frozenset(tok.get_added_tokens_decoder())
        self._ctx = _context_id(tok)
        self._head = tok.decode([self._ctx]) if self._ctx is not None else ""
        self._known: dict[int, bytes] = {}

    def __call__(self, i: int) -> bytes:
        b = self._known.get(i)
        if b is None:
            b = self._known[i] = self._work_out(i)
        return b

    def _work_out(self, i: int) -> bytes:
        piece = self._tok.id_to_token(i) if i >= 0 else None
        if piece is None:
            return b""
        if i not in self._added:
            if self._byte_of is not None:
                try:
                    return bytes(map(self._byte_of, piece))
                except KeyError:  # a piece outside the byte alphabet stands for its own text
                    pass
            elif self._byte_fallback and (m := _BYTE_TOKEN.fullmatch(piece)):
                return bytes([int(m.group(1), 16)])
        if self._ctx is None:
            return self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
        text = self._tok.decode([self._ctx, i], skip_special_tokens=False)
        if not text.startswith(self._head):
            text = self._head + self._tok.decode([i], skip_special_tokens=False)
        return text[len(self._head):].encode("utf-8")


def _normalizer_factor(spec: dict[str, Any]) -> float:
    """How many times shorter (in UTF-8 bytes) the normalizer can make a text."""
    factor = 1.0
    for part in _components(spec.get("normalizer"), "normalizers"):
        kind = part.get("type")
        if kind == "Prepend":
            continue
        if kind == "Replace":
            pattern = part.get("pattern", {}).get("String")
            content = part.get("content", "").encode("utf-8")
            if pattern is None or not content:
                return math.inf
            factor *= max(1.0, len(pattern.encode("utf-8")) / len(content))
        elif kind in _UNICODE_NORMALIZERS:
            factor *= _UNICODE_NORMALIZERS[kind]
        else:  # Strip, StripAccents, Precompiled (collapses whitespace), BertNormalizer (drops controls), ...
            return math.inf
    return factor


def _pre_tokenizer_keeps_text(spec: dict[str, Any]) -> bool:
    for part in _components(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = part.get("type")
        if kind == "Split" and part.get("behavior") != "Removed":
            continue
        if kind not in _SPLITTING_PRE_TOKENIZERS:
            return False
    return True


def _unknowns_fuse(model: dict[str, Any]) -> bool:
    """Whether one unknown token can stand for a run of characters of any length."""
    if model.get("byte_fallback"):
        return False
    kind = model.get("type")
    if kind == "BPE":
        return model.get("unk_token") is not None and bool(model.get("fuse_unk"))
    if kind == "Unigram":
        return model.get("unk_id") is not None  # consecutive unknown characters become one token
    return kind == "WordPiece"  # a word longer than its limit is one [UNK]


def max_input_bytes_per_token(tok: Tokenizer) -> int:
    """The most bytes of input text one token can cover (``UNBOUNDED`` where nothing bounds it).

    A token covers a stretch of the normalized text equal to its vocabulary piece (a byte-level
    piece: the bytes it maps to, exactly the input's); the input it came from is at most the
    normalizer's shrink factor longer. An unknown token covers one character (4 bytes) unless
    unknowns fuse."""
    spec = _spec(tok)
    if not _pre_tokenizer_keeps_text(spec) or _unknowns_fuse(spec.get("model", {})):
        return UNBOUNDED
    added = tok.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip for t in added.values()):
        return UNBOUNDED
    alphabet = frozenset(_gpt2_chars()) if "ByteLevel" in _decoder_types(spec) else frozenset()
    model = spec.get("model", {})
    longest = 4 if model.get("unk_token") is not None or model.get("unk_id") is not None else 1
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        # A byte-level piece stands for one input byte per character.
        byte_piece = bool(alphabet) and i not in added and alphabet.issuperset(piece)
        longest = max(longest, len(piece) if byte_piece else len(piece.encode("utf-8")))
    factor = _normalizer_factor(spec)
    return UNBOUNDED if math.isinf(factor) else min(UNBOUNDED, math.ceil(longest * factor))


def decoder_types(tok: Tokenizer) -> frozenset[str]:
    """The kinds of the tokenizer's decoder steps (``{"Replace", "ByteFallback", "Fuse"}``)."""
    return frozenset(_decoder_types(_spec(tok)))


def byte_fallback_ids(tok: Tokenizer) -> frozenset[int]:
    """The ids of ``<0x..>`` byte tokens, when the decoder reads them as bytes (else empty)."""
    if "ByteFallback" not in _decoder_types(_spec(tok)):
        return frozenset()
    ids = (tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class IncrementalDetokenizer:
    """Turns one request's stream of token ids into text pieces, as the tokenizer's decoder would.

    ``add`` returns the text a token adds (``""`` while a character cut across tokens is incomplete,
    or for a skipped special token); ``flush`` at the end returns what is still held back (bytes that
    never formed a character, as U+FFFD). The pieces join to ``Tokenizer.decode(ids,
    skip_special_tokens=skip_special)``. A token costs a decode of a few recent ids, not of the text.

    ``byte_ids``: the tokenizer's byte-fallback tokens. Its decoder turns a run of them that is not
    valid UTF-8 into one U+FFFD per byte (not only the bad ones), so a run is held back whole until
    a token of another kind ends it; tokens the decode skips (special ones when ``skip_special``,
    ids outside the vocabulary) do not end a run, because the decode joins the bytes around them.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True, byte_ids: frozenset[int] = frozenset(),
                 special_ids: frozenset[int] = frozenset()):
        self._tok = tok
        self._skip = skip_special
        self._stream = DecodeStream(skip_special_tokens=skip_special)
        self._byte_ids = byte_ids
        self._transparent = (special_ids if skip_special else frozenset()) if byte_ids else frozenset()
        self._vocab = tok.get_vocab_size(with_added_tokens=True)
        self._ids: list[int] = []
        self._run: list[int] = []  # byte tokens (and skipped ids among them) not yet decoded
        self._emitted = 0  # characters handed out
        self._held = False  # some ids since the last piece gave no text yet

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._byte_ids and (token_id in self._byte_ids or token_id in self._transparent
                               or not 0 <= token_id < self._vocab):
            self._run.append(token_id)
            self._held = True
            return ""
        batch, self._run = [*self._run, token_id], []
        try:
            piece = self._stream.step(self._tok, batch if len(batch) > 1 else token_id)
        except Exception:  # noqa: BLE001 (tokenizers raises plain Exception when its window cannot be reconciled)
            piece = self._resync()
        if piece is None:
            self._held = True
            return ""
        self._held = False
        self._emitted += len(piece)
        return piece

    def _resync(self) -> str | None:
        """Decode everything once and restart the stream after it (rare: a decoder whose output for
        the window does not extend its output for the window's start)."""
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        self._stream = DecodeStream(ids=self._ids[-1:], skip_special_tokens=self._skip)
        if text.endswith("\ufffd") or len(text) <= self._emitted:
            return None
        return text[self._emitted:]

    def flush(self) -> str:
        if not self._held:
            return ""
        self._held = False
        self._run = []
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        tail = text[self._emitted:]
        self._emitted = max(self._emitted, len(text))
        return tail
