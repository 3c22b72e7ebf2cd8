"""Tokenizer: byte-level BPE (``tokenizers``), the model's own chat template (jinja2), and
incremental detokenization for streaming.

Saved beside a checkpoint as ``tokenizer.json`` (the ``tokenizers`` format) and
``tokenizer_config.json`` (chat template, special token ids).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2 splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (known: smollm, gpt2, llama-bpe)")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    add_bos_token: bool = False
    special_ids: tuple[int, ...] = ()


def tokenizer_from_gguf(fields: dict[str, Any]) -> tuple[Tokenizer, TokenizerConfig]:
    """Build the tokenizer from GGUF metadata (``tokenizer.ggml.*``, already decoded)."""
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, "
                         f"got {fields.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    special = [i for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                            for i in special])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    cfg = TokenizerConfig(
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        chat_template=fields.get("tokenizer.chat_template"),
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        special_ids=tuple(i for i in special if types[i] == _CONTROL),
    )
    return tok, cfg


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template."""


class TextTokenizer:
    """Encode text, render chat messages, decode ids (whole or incrementally)."""

    def __init__(self, tok: Tokenizer, cfg: TokenizerConfig):
        self.tok = tok
        self.cfg = cfg
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(cfg.special_ids)
        self._token_bytes = self._byte_table()
        self._template = None
        if cfg.chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(cfg.chat_template)

    def _byte_table(self) -> list[bytes]:
        """The exact bytes each token id stands for (special tokens: their text)."""
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs, n = list(bs), 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        byte_of = {chr(c): b for b, c in zip(bs, cs)}
        table = []
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None:
                table.append(b"")
            elif i in self._special or any(ch not in byte_of for ch in piece):
                table.append(piece.encode("utf-8"))
            else:
                table.append(bytes(byte_of[ch] for ch in piece))
        return table

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a text of ``b`` bytes has >= b / this tokens."""
        return max(map(len, self._token_bytes), default=1) or 1

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.cfg.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.cfg.add_bos_token and self.cfg.bos_token_id is not None:
            ids = [self.cfg.bos_token_id, *ids]
        return ids

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; send text or token ids")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self._piece(self.cfg.bos_token_id),
                                         eos_token=self._piece(next(iter(self.cfg.eos_token_ids), None)))
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template refused the messages: {e}") from e

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode_rendered(self.render_chat(messages))

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat, which already holds its special tokens as text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def _piece(self, i: int | None) -> str:
        return "" if i is None else (self.tok.id_to_token(i) or "")

    def token_bytes(self, i: int, skip_special: bool = True) -> bytes:
        if skip_special and i in self._special:
            return b""
        return self._token_bytes[i] if 0 <= i < self.vocab_size else b""

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special)

    def save(self, directory: pathlib.Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, directory: pathlib.Path) -> TextTokenizer:
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        d = json.loads((directory / "tokenizer_config.json").read_text())
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        d["special_ids"] = tuple(d.get("special_ids", ()))
        return cls(tok, TokenizerConfig(**d))


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Bytes of a character cut across tokens are held until the character completes; bytes that
    can never form valid UTF-8 become U+FFFD exactly as a whole decode would. ``flush`` at the
    end emits whatever is still held, so the concatenated pieces equal ``decode(all ids)``.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id, self._skip_special))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
