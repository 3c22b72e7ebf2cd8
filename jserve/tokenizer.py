"""Tokenizer: the model's ``tokenizers`` tokenizer, its chat template (``chat_template.py``) and
incremental detokenization for streaming (``detokenize.py``).

Saved beside a checkpoint as ``tokenizer.json`` (the ``tokenizers`` format) and
``tokenizer_config.json`` (chat template(s), special token ids and names); a ``chat_template.jinja``
beside them takes the place of the config's template, as in transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from jserve.chat_template import ChatTemplate, ChatTemplateError, Templates, load_templates, normalize_templates
from jserve.detokenize import (
    IncrementalDetokenizer,
    TokenBytes,
    byte_fallback_ids,
    decoder_types,
    max_input_bytes_per_token,
)

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "TextTokenizer", "TokenizerConfig", "tokenizer_from_gguf"]

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

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
    """``chat_template``: one template, or templates by name (``default``, ``tool_use``);
    ``special_tokens``: the named special tokens templates see (``{"bos_token": "<s>", ...}``;
    None: ``bos_token`` / ``eos_token`` from the ids)."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: Templates | None
    add_bos_token: bool = False
    special_ids: tuple[int, ...] = ()
    special_tokens: dict[str, str] | None = None


def _byte_level_from_gguf(fields: dict[str, Any], tokens: list[str]) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_from_gguf(fields: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    """llama.cpp's SentencePiece vocabulary (``"llama"``: Llama 2, Mistral v0.x, Gemma, Phi-3) as a BPE
    with byte fallback, Metaspace normalization and decoding. SentencePiece's BPE merges the pair
    whose merged piece scores highest, so the merges are every split of a normal piece into two
    pieces of the vocabulary, ranked by the merged piece's score."""
    scores: list[float] = list(fields.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != _NORMAL:
            continue
        for k in range(1, len(piece)):
            a, b = vocab.get(piece[:k]), vocab.get(piece[k:])
            if a is not None and b is not None and types[a] in (_NORMAL, _UNKNOWN) and types[b] in (_NORMAL, _UNKNOWN):
                ranked.append((-scores[i], i, a, b))
    ranked.sort()
    merges = [(tokens[a], tokens[b]) for _, _, a, b in ranked]
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tok


def _gguf_templates(fields: dict[str, Any]) -> Templates | None:
    """``tokenizer.chat_template`` plus any ``tokenizer.chat_template.<name>`` (named templates)."""
    named = {k.removeprefix("tokenizer.chat_template."): v for k, v in fields.items()
             if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
    main = fields.get("tokenizer.chat_template")
    if not named:
        return main
    return normalize_templates({**({"default": main} if main else {}), **named})


def tokenizer_from_gguf(fields: dict[str, Any]) -> tuple[Tokenizer, TokenizerConfig]:
    """Build the tokenizer from GGUF metadata (``tokenizer.ggml.*``, already decoded): byte-level
    BPE (``"gpt2"``) or SentencePiece (``"llama"``)."""
    model = fields.get("tokenizer.ggml.model")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = list(fields.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if model == "gpt2":
        tok = _byte_level_from_gguf(fields, tokens)
    elif model == "llama":
        tok = _sentencepiece_from_gguf(fields, tokens, types)
    else:
        raise ValueError(f"only byte-level BPE ('gpt2') and SentencePiece ('llama') GGUF tokenizers are "
                         f"supported, got {model!r}")
    special = [i for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                            for i in special])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    cfg = TokenizerConfig(
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        chat_template=_gguf_templates(fields),
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama")),
        special_ids=tuple(i for i in special if types[i] == _CONTROL),
    )
    return tok, cfg


class TextTokenizer:
    """Encode text, render chat messages, decode ids (whole or incrementally)."""

    def __init__(self, tok: Tokenizer, cfg: TokenizerConfig):
        self.tok = tok
        self.cfg = cfg
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # What ``Tokenizer.decode(skip_special_tokens=True)`` leaves out.
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._byte_ids = byte_fallback_ids(tok)
        self._chat = ChatTemplate(cfg.chat_template, self._special_tokens()) if cfg.chat_template else None

    def _special_tokens(self) -> dict[str, str]:
        named = {"bos_token": self._piece(self.cfg.bos_token_id),
                 "eos_token": self._piece(next(iter(self.cfg.eos_token_ids), None))}
        return {**{k: v for k, v in named.items() if v}, **(self.cfg.special_tokens or {})}

    @functools.cached_property
    def _token_bytes(self) -> TokenBytes:
        return TokenBytes(self.tok)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of input text one token can cover: a text of ``b`` bytes has >= b / this
        tokens (``detokenize.UNBOUNDED`` for tokenizers where nothing bounds it)."""
        return max_input_bytes_per_token(self.tok)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.cfg.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._chat

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.cfg.add_bos_token and self.cfg.bos_token_id is not None:
            ids = [self.cfg.bos_token_id, *ids]
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The chat as the model's template renders it in transformers' ``apply_chat_template``.
        ``messages`` may carry any fields (``tool_calls``, ``tool_call_id``, content None or parts);
        ``tools``: OpenAI-style tool dicts; ``template_kwargs``: more variables (``documents``,
        ``enable_thinking``, ``template_name`` to pick a named template)."""
        if self._chat is None:
            raise ChatTemplateError("this model has no chat template; send text or token ids")
        return self._chat.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                 **template_kwargs)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                    **template_kwargs: Any) -> list[int]:
        return self.encode_rendered(self.render_chat(messages, tools=tools, **template_kwargs))

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat, which already holds its special tokens as text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def _piece(self, i: int | None) -> str:
        return "" if i is None else (self.tok.id_to_token(i) or "")

    def token_bytes(self, i: int, skip_special: bool = True) -> bytes:
        """The bytes token ``i`` stands for in the middle of a text (possibly part of a character;
        ``b""`` for a skipped special token or an id outside the vocabulary)."""
        if skip_special and i in self.special_ids:
            return b""
        return self._token_bytes(i) if 0 <= i < self.vocab_size else b""

    def llguidance_tokenizer(self, n_vocab: int, eos_token_ids: Sequence[int]) -> Any:
        """llguidance's view of this tokenizer, for structured output. llguidance reads a
        ``tokenizer.json`` itself when its decoder is byte-level or Llama 2's (``▁`` replaced, byte
        fallback, fuse, strip); for other kinds (a Metaspace decoder, Unigram, WordPiece) it would
        take ``▁`` for text, so it is handed each token's bytes (``token_bytes``) and an encoder."""
        from llguidance import LLTokenizer, TokenizerWrapper

        eos = eos_token_ids[0] if eos_token_ids else None
        if decoder_types(self.tok) <= _LLGUIDANCE_DECODERS:
            return LLTokenizer(self.tok.to_str(), n_vocab=n_vocab, eos_token=eos)
        return LLTokenizer(TokenizerWrapper(_LLGuidanceVocabulary(self, eos)), n_vocab=n_vocab, eos_token=eos)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def detokenizer(self, skip_special: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tok, skip_special, self._byte_ids, self.special_ids)

    def save(self, directory: pathlib.Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))
        d = dataclasses.asdict(self.cfg)
        if d["special_tokens"] is None:  # the names come from the ids
            del d["special_tokens"]
        (directory / "tokenizer_config.json").write_text(json.dumps(d, indent=2))

    @classmethod
    def load(cls, directory: pathlib.Path) -> TextTokenizer:
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        d = json.loads((directory / "tokenizer_config.json").read_text())
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        d["special_ids"] = tuple(d.get("special_ids", ()))
        d["chat_template"] = load_templates(directory)
        return cls(tok, TokenizerConfig(**d))


# Decoders whose ``tokenizer.json`` llguidance reads correctly itself.
_LLGUIDANCE_DECODERS = frozenset({"ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip"})
_MARKER = "\x02"


class _LLGuidanceVocabulary:
    """What ``llguidance.TokenizerWrapper`` reads: each token's bytes, the special ids, an encoder."""

    def __init__(self, tokenizer: TextTokenizer, eos: int | None):
        self._tok = tokenizer.tok
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.cfg.bos_token_id
        self.tokens = [tokenizer.token_bytes(i, skip_special=False) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str) -> list[int]:
        """Ids of ``text`` in the middle of a text: llguidance tokenizes the bytes a grammar forces,
        which must not gain the ``▁`` a SentencePiece-style tokenizer puts at the start. So the
        text is encoded after a marker character no piece contains, and the marker's ids dropped."""
        head = self._tok.encode(_MARKER, add_special_tokens=False).ids
        ids = self._tok.encode(_MARKER + text, add_special_tokens=False).ids
        if ids[:len(head)] == head:
            return ids[len(head):]
        return self._tok.encode(text, add_special_tokens=False).ids
