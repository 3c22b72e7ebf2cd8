"""Chat templates rendered as transformers' ``apply_chat_template`` renders them.

A model's chat template is a Jinja program written against transformers' environment, so it is
rendered here in the same one: a sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension (``break`` / ``continue``), a ``{% generation %}`` block (rendered as its
body), the globals ``raise_exception`` and ``strftime_now``, and a ``tojson`` filter that keeps
non-ASCII text and key order (Jinja's own escapes HTML characters and sorts keys). The variables are
transformers' too: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's
named special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword (``enable_thinking``).

A model may have several templates by name (``tokenizer_config.json``'s list of
``{"name", "template"}``, or ``chat_template.jinja`` plus ``additional_chat_templates/*.jinja``);
the one used is chosen as transformers chooses: ``tool_use`` when tools are given and it exists,
else ``default``.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

# The tokenizer attributes transformers passes to every template (its ``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning comes under; transformers fills the others from the first one set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Templates = str | dict[str, str]
# What a template raises on messages it cannot handle: its own refusal (``raise_exception``), or an
# operation on a field of the wrong type (content parts added to a string, a missing key, ...).
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template."""


def normalize_templates(value: Any) -> Templates | None:
    """A ``chat_template`` value as configs hold it (a string, a list of ``{"name", "template"}``
    or a name → template mapping) as a string or a name → template dict."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return {str(t["name"]): str(t["template"]) for t in value}
    raise ValueError(f"a chat template must be a string or a list of named templates, got {type(value).__name__}")


def load_templates(directory: pathlib.Path) -> Templates | None:
    """The chat templates of a Hugging Face tokenizer directory, read as transformers reads them:
    ``chat_template.jinja`` (the default) and ``additional_chat_templates/<name>.jinja`` take the
    place of ``tokenizer_config.json``'s ``chat_template`` when present."""
    files: dict[str, str] = {}
    if (directory / "chat_template.jinja").is_file():
        files["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            files[f.stem] = f.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    config = directory / "tokenizer_config.json"
    if config.is_file():
        return normalize_templates(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    return None


def special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens (``bos_token``: ``"<s>"``, ...) of an HF ``tokenizer_config.json``,
    whose values are strings or ``{"content": ...}`` objects."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        v = tokenizer_config.get(name)
        if isinstance(v, Mapping):
            v = v.get("content")
        if isinstance(v, str):
            out[name] = v
    return out


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering
    it is rendering its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore names, which could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (``self`` may be a keyword, as in Jinja)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not set the attribute {name!r} on a namespace")


def _environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


def _message(m: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to a template: keys whose value is None dropped (templates
    handle a missing ``content`` and print "None" for a null one), reasoning under all its names."""
    out = {k: v for k, v in m.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


class ChatTemplate:
    """A model's chat template(s), compiled once.

    ``templates``: one template, or templates by name (``default``, ``tool_use``, ...);
    ``special``: the named special tokens every render sees (``bos_token``: ``"<s>"``, ...)."""

    def __init__(self, templates: Templates | list[dict[str, str]], special: Mapping[str, str] | None = None):
        templates = normalize_templates(templates)
        if not templates:
            raise ValueError("no chat template given")
        env = _environment()
        self.source = templates
        self._compiled = ({"": env.from_string(templates)} if isinstance(templates, str)
                          else {name: env.from_string(t) for name, t in templates.items()})
        self.special = dict(special or {})

    @property
    def names(self) -> tuple[str, ...]:
        """The templates' names (empty for a model with a single unnamed template)."""
        return () if "" in self._compiled else tuple(self._compiled)

    def _name(self, tools: Sequence[Any] | None, name: str | None) -> str:
        if "" in self._compiled:
            if name is not None:
                raise ChatTemplateError(f"this model has a single chat template; there is none named {name!r}")
            return ""
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in self._compiled else "default"
        if name not in self._compiled:
            raise ChatTemplateError(f"this model has no chat template named {name!r} "
                                    f"(it has {', '.join(sorted(self._compiled))})")
        return name

    def choose(self, tools: Sequence[Any] | None = None, name: str | None = None) -> jinja2.Template:
        """The template transformers would use: ``name`` if given, else ``tool_use`` when tools are
        given and the model has one, else ``default``."""
        return self._compiled[self._name(tools, name)]

    def text(self, tools: Sequence[Any] | None = None, name: str | None = None) -> str:
        """The source of the template ``choose`` picks (to tell, say, whether it renders tools)."""
        key = self._name(tools, name)
        return self.source if isinstance(self.source, str) else self.source[key]

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
               template_name: str | None = None, **template_kwargs: Any) -> str:
        """The chat as text. ``messages``: dicts with ``role`` and any other fields (``content`` as text,
        None or a list of parts, ``tool_calls``, ``tool_call_id``, ``name``, ...), passed through;
        ``tools``: OpenAI-style tool dicts; ``template_kwargs``: more template variables
        (``enable_thinking=False``), overriding the special tokens of the same name."""
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be JSON schemas (objects)")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be objects with 'title' and 'text'")
        if not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError("chat messages must be objects")
        template = self.choose(tools, template_name)
        variables = {**self.special, **template_kwargs}
        try:
            return template.render(messages=[_message(m) for m in messages],
                                   tools=None if tools is None else list(tools),
                                   documents=None if documents is None else list(documents),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except _RENDER_ERRORS as e:
            raise ChatTemplateError(f"chat template refused the messages: {e}") from e
