"""A tiny tool-capable checkpoint (random weights, SmolLM2's tokenizer plus ``<tool_call>`` and
``</tool_call>`` as special tokens, a Qwen-style template that renders ``tools``) and one server
process on it shared by the HTTP and gRPC tool, endpoint, client and Responses API tests (started once
per session), and one shared server on the default SmolLM2 for the generic fallback's tests."""

from __future__ import annotations

import atexit
import json
import pathlib

from .servers import ServerProcess

# Qwen 2.5's layout, written here: tools listed in the system turn inside <tools>, calls as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results in user turns as <tool_response>.
QWEN_STYLE_TEMPLATE = """\
{%- set sys = messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' -%}
<|im_start|>system
{{ sys }}
{%- if tools %}

# Tools

You may call one or more functions. Their signatures are within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each call, return a JSON object within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{%- endif %}<|im_end|>
{% for m in messages -%}
{%- if m.role == 'system' and loop.first -%}
{%- elif m.role == 'assistant' -%}
<|im_start|>assistant
{%- if m.content %}
{{ m.content }}
{%- endif %}
{%- for call in m.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
<tool_call>
{"name": "{{ fn.name }}", "arguments": {{ fn.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""


def save_tool_checkpoint(out: pathlib.Path, real_ckpt: pathlib.Path) -> pathlib.Path:
    """Write the tiny tool-capable checkpoint to ``out`` and return it."""
    from tokenizers import AddedToken, Tokenizer

    from jserve import checkpoint
    from jserve.config import tiny_config

    tok = Tokenizer.from_file(str(real_ckpt / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg_json = json.loads((real_ckpt / "tokenizer_config.json").read_text())
    cfg = tiny_config(vocab_size=vocab, eos_token_ids=tuple(cfg_json["eos_token_ids"]), bos_token_id=1)
    checkpoint.save(out, cfg, checkpoint.random_weights(cfg), None)
    tok.save(str(out / "tokenizer.json"))
    cfg_json["chat_template"] = QWEN_STYLE_TEMPLATE
    cfg_json["special_ids"] = sorted({*cfg_json.get("special_ids", []), vocab - 2, vocab - 1})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    return out


_SHARED: dict[str, ServerProcess] = {}
SERVER_ARGS = ("--slots", "4", "--max-len", "512", "--max-prompt-len", "384", "--http-port", "0")


def shared_tool_server(tmp_path_factory, real_ckpt: pathlib.Path) -> ServerProcess:
    """The session's server on the tiny tool checkpoint (stopped when the interpreter exits)."""
    if "tiny" not in _SHARED:
        ckpt = save_tool_checkpoint(tmp_path_factory.mktemp("toolckpt") / "tiny-tools", real_ckpt)
        _SHARED["tiny"] = ServerProcess(ckpt, *SERVER_ARGS)
        atexit.register(_SHARED["tiny"].stop)
    return _SHARED["tiny"]


SMOLLM2_ARGS = ("--slots", "2", "--max-len", "1024", "--max-prompt-len", "512", "--http-port", "0")


def shared_smollm2_server(real_ckpt: pathlib.Path) -> ServerProcess:
    """The session's server on the default SmolLM2 (gRPC and HTTP; stopped when the interpreter exits)."""
    if "smollm2" not in _SHARED:
        _SHARED["smollm2"] = ServerProcess(real_ckpt, *SMOLLM2_ARGS)
        atexit.register(_SHARED["smollm2"].stop)
    return _SHARED["smollm2"]


