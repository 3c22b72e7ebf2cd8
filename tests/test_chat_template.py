"""Chat templates render as transformers' ``apply_chat_template`` renders them.

Templates written here each use one feature (loop controls, ``strftime_now``, ``tojson`` with
non-ASCII text, indent and separators, ``raise_exception``, a tools loop with tool calls and tool
results, named templates, ``chat_template.jinja`` files, extra variables, ``namespace``, the
``generation`` block, content parts, reasoning). Each is rendered by jserve and by transformers
(the ``reference`` extra; those tests are skipped without it) and the texts compared.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jserve.chat_template import ChatTemplate, ChatTemplateError, load_templates, special_tokens
from jserve.tokenizer import TextTokenizer, TokenizerConfig

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers (the 'reference' extra) is not installed")



def _transformers_has(name: str) -> bool:
    """Whether the installed transformers has ``chat_template_utils.<name>`` (newer behaviour jserve
    follows: null fields dropped from messages, reasoning under all its names)."""
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers.utils import chat_template_utils

    return hasattr(chat_template_utils, name)


SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}

LOOPCONTROLS = (
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% if loop.index > 4 %}{% break %}{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
)
STRFTIME = "{{ bos_token }}Today is {{ strftime_now('%Y') }}.{% for m in messages %}{{ m.content }}{% endfor %}"
TOJSON = (
    "{% for m in messages %}{{ m | tojson }}\n{{ m.content | tojson }}\n{{ m | tojson(indent=2) }}\n"
    "{{ m | tojson(separators=(',', ':')) }}\n{{ m | tojson(sort_keys=true) }}\n{% endfor %}"
)
RAISE = (
    "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
    "{{ raise_exception('Only user and assistant roles are supported, got ' + m.role) }}{% endif %}"
    "{{ m.content }}{% endfor %}"
)
TOOLS = """{%- if tools %}
<|im_start|>system
You may call these tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
<|im_end|>
{%- endif %}
{%- set ns = namespace(calls=0) %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
<|im_start|>assistant
        {%- if message.content %}{{ message.content }}{% endif %}
        {%- for call in message.tool_calls %}
            {%- set ns.calls = ns.calls + 1 %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
        {%- endfor %}
<|im_end|>
    {%- elif message.role == 'tool' %}
<|im_start|>tool {{ message.tool_call_id }}
{{ message.content }}<|im_end|>
    {%- else %}
<|im_start|>{{ message.role }}
        {%- if message.content is string %}{{ message.content }}
        {%- elif message.content is none %}(null)
        {%- elif message.content is not defined %}(none)
        {%- else %}{% for part in message.content %}[{{ part.type }}]{{ part.text }}{% endfor %}{% endif %}
<|im_end|>
    {%- endif %}
{%- endfor %}
{{- '\\ncalls: ' ~ ns.calls }}
{%- if add_generation_prompt %}
<|im_start|>assistant
{%- if enable_thinking is defined and not enable_thinking %}
<think>

</think>
{%- endif %}
{%- endif %}"""
GENERATION = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
REASONING = ("{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}\n"
             "{% endfor %}")
DOCUMENTS = "{% for d in documents %}[{{ d.title }}] {{ d.text }}\n{% endfor %}{{ messages[-1].content }}"

CHAT = [
    {"role": "system", "content": "Be brief — très brief."},
    {"role": "user", "content": "Café 東京 <b>&amp;</b> \"quoted\" 🙂"},
    {"role": "assistant", "content": "Sure."},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Fifth user turn"},
]
TOOL_DEFS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "number"}, "b": {"type": "number"}}}}},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich, and 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "12 °C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
    {"role": "user", "content": [{"type": "text", "text": "Thanks! "}, {"type": "text", "text": "Bye."}]},
]


def _byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges and the two special tokens (templates only need text)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    t = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(list(SPECIAL.values()))
    return t


def _hf(real_ckpt: pathlib.Path, template):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(), chat_template=template, **SPECIAL)


def _ours(real_ckpt: pathlib.Path, template) -> TextTokenizer:
    cfg = TokenizerConfig(bos_token_id=None, eos_token_ids=(), chat_template=template, special_tokens=SPECIAL)
    return TextTokenizer(_byte_tokenizer(), cfg)


def _both(real_ckpt, template, messages, **kwargs) -> tuple[str, str]:
    """(transformers' text, jserve's text) of ``messages`` under ``template``."""
    kwargs.setdefault("add_generation_prompt", True)
    hf = _hf(real_ckpt, template).apply_chat_template(messages, tokenize=False, **kwargs)
    return hf, _ours(real_ckpt, template).render_chat(messages, **kwargs)


@needs_transformers
@pytest.mark.parametrize("template", [LOOPCONTROLS, STRFTIME, TOJSON, GENERATION, pytest.param(
    REASONING, marks=pytest.mark.skipif(not _transformers_has("_alias_reasoning_fields"),
                                        reason="this transformers passes reasoning under its own name only"))],
    ids=["loopcontrols", "strftime_now", "tojson", "generation", "reasoning"])
def test_template_features_render_as_transformers(real_ckpt, template):
    messages = CHAT + [{"role": "assistant", "content": "ok", "reasoning_content": "thought about it"}]
    hf, ours = _both(real_ckpt, template, messages)
    assert ours == hf and ours


@needs_transformers
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True},
                                    {"add_generation_prompt": False}], ids=["plain", "no-think", "think", "no-prompt"])
def test_tools_tool_calls_and_tool_results_render_as_transformers(real_ckpt, kwargs):
    hf, ours = _both(real_ckpt, TOOLS, TOOL_CHAT, tools=TOOL_DEFS, **kwargs)
    assert ours == hf
    assert "Zürich" in ours and "calls: 2" in ours and "[text]Thanks! [text]Bye." in ours
    hf, ours = _both(real_ckpt, TOOLS, TOOL_CHAT[:1], **kwargs)  # no tools: the template's tools is None
    assert ours == hf and "You may call" not in ours


@needs_transformers
@pytest.mark.skipif(not _transformers_has("_normalize_chat_messages"),
                    reason="this transformers passes null fields to the template (newer ones drop them, as jserve)")
def test_null_content_and_documents_render_as_transformers(real_ckpt):
    messages = [{"role": "user", "content": None}, {"role": "user", "content": "q"}]
    hf, ours = _both(real_ckpt, TOOLS, messages)
    assert ours == hf
    docs = [{"title": "Doc ü", "text": "Body one"}, {"title": "Two", "text": "Body two"}]
    assert _both(real_ckpt, DOCUMENTS, messages[1:], documents=docs)[0] == _ours(real_ckpt, DOCUMENTS).render_chat(
        messages[1:], documents=docs)


@needs_transformers
def test_raise_exception_refuses_as_transformers_does(real_ckpt):
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="Only user and assistant") as hf_error:
        _hf(real_ckpt, RAISE).apply_chat_template(CHAT, tokenize=False)
    with pytest.raises(ChatTemplateError) as ours:
        _ours(real_ckpt, RAISE).render_chat(CHAT)
    assert str(hf_error.value) in str(ours.value)
    hf, ours_text = _both(real_ckpt, RAISE, CHAT[1:])
    assert ours_text == hf


NAMED = {"default": "default:{% for m in messages %}{{ m.content }}{% endfor %}",
         "tool_use": "tool_use:{{ tools | length }}:{% for m in messages %}{{ m.content }}{% endfor %}",
         "other": "other:{{ messages | length }}"}


@needs_transformers
def test_named_templates_are_chosen_as_transformers_chooses(real_ckpt):
    as_list = [{"name": k, "template": v} for k, v in NAMED.items()]
    for tools in (None, TOOL_DEFS):
        hf, ours = _both(real_ckpt, NAMED, CHAT[:2], tools=tools)
        assert ours == hf and ours.startswith("tool_use:2" if tools else "default:")
        assert _ours(real_ckpt, as_list).render_chat(CHAT[:2], tools=tools) == ours
    hf = _hf(real_ckpt, NAMED).apply_chat_template(CHAT, tokenize=False, chat_template="other")
    assert _ours(real_ckpt, NAMED).render_chat(CHAT, template_name="other") == hf == "other:6"
    with pytest.raises(ChatTemplateError, match="no chat template named 'missing'"):
        _ours(real_ckpt, NAMED).render_chat(CHAT, template_name="missing")


@needs_transformers
@pytest.mark.parametrize("template", [TOOLS, NAMED], ids=["single", "named"])
def test_templates_saved_by_transformers_load_and_render_the_same(real_ckpt, tmp_path, template):
    """transformers saves a single template as ``chat_template.jinja`` and named ones as
    ``additional_chat_templates/<name>.jinja``; both are read, and take the config's place."""
    from transformers import AutoTokenizer

    _hf(real_ckpt, template).save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "stale template in the config"  # the .jinja file wins, as in transformers
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = ChatTemplate(load_templates(tmp_path), special_tokens(config))
    for tools in (None, TOOL_DEFS):
        assert ours.render(TOOL_CHAT, tools=tools) == hf.apply_chat_template(
            TOOL_CHAT, tools=tools, tokenize=False, add_generation_prompt=True)


def test_tojson_keeps_non_ascii_and_key_order_and_loops_can_break(real_ckpt):
    """Without transformers: the behaviour that differed from Jinja's defaults."""
    ours = _ours(real_ckpt, "{{ messages[0] | tojson }}").render_chat([{"role": "user", "content": "東京 <b>"}])
    assert ours == json.dumps({"role": "user", "content": "東京 <b>"}, ensure_ascii=False)
    text = _ours(real_ckpt, LOOPCONTROLS).render_chat(CHAT)
    assert text.count("\n") == 3 and "system" not in text


def test_jserve_checkpoint_reads_a_chat_template_jinja_beside_its_config(real_ckpt, tmp_path):
    tok = TextTokenizer.load(real_ckpt)
    tok.save(tmp_path)
    assert tok.render_chat(CHAT[1:2]) == TextTokenizer.load(tmp_path).render_chat(CHAT[1:2])
    (tmp_path / "chat_template.jinja").write_text("jinja file: {{ messages[0].content }}")
    assert TextTokenizer.load(tmp_path).render_chat(CHAT[1:2]) == "jinja file: " + CHAT[1]["content"]


def test_messages_keep_their_other_fields_for_the_template(real_ckpt):
    tok = _ours(real_ckpt, TOOLS)
    text = tok.render_chat(TOOL_CHAT, tools=TOOL_DEFS)
    assert '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' in text
    assert "<|im_start|>tool call_1\n12 °C<|im_end|>" in text
    ids = tok.encode_chat(TOOL_CHAT, tools=TOOL_DEFS, enable_thinking=False)
    assert tok.decode(ids, skip_special=False).endswith("calls: 2<|im_start|>assistant<think>\n\n</think>")
    assert ids.count(tok.tok.token_to_id("<|im_start|>")) == 7


def test_hf_import_reads_jinja_files_named_templates_and_special_token_names(tmp_path):
    from types import SimpleNamespace

    from jserve.hf_import import _hf_tokenizer

    src, out = tmp_path / "hf", tmp_path / "jserve"
    src.mkdir()
    out.mkdir()
    _byte_tokenizer().save(str(src / "tokenizer.json"))
    config = {"chat_template": [{"name": "default", "template": "from the config"}],
              "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    model = SimpleNamespace(bos_token_id=None, eos_token_ids=())
    assert _hf_tokenizer(src, model).render_chat(CHAT) == "from the config"
    (src / "chat_template.jinja").write_text("{{ bos_token }}jinja{{ eos_token }}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("tools:{{ tools | length }}")
    tok = _hf_tokenizer(src, model)
    tok.save(out)
    for t in (tok, TextTokenizer.load(out)):
        assert t.render_chat(CHAT) == "<|im_start|>jinja<|im_end|>"
        assert t.render_chat(CHAT, tools=TOOL_DEFS) == "tools:2"


def test_a_template_failing_on_a_field_of_the_wrong_type_is_a_chat_template_error(real_ckpt):
    tok = _ours(real_ckpt, "{{ messages[0].content + '!' }}")
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "hi!"
    with pytest.raises(ChatTemplateError, match="refused the messages"):
        tok.render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_the_chosen_templates_source_is_available(real_ckpt):
    tok = _ours(real_ckpt, NAMED)
    assert tok.chat_template.text() == NAMED["default"]
    assert tok.chat_template.text(tools=TOOL_DEFS) == NAMED["tool_use"]
    assert _ours(real_ckpt, TOOLS).chat_template.text(tools=TOOL_DEFS) == TOOLS
