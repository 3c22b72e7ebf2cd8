"""What the tool-calling tests share: the tools (three schemas, OpenAI's JSON of them), two calls'
arguments written out, and the real SmolLM2 tokenizer loaded once."""

from __future__ import annotations

from jserve.checkpoint import load_tokenizer

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["items", "express"],
         "properties": {"items": {"type": "array", "maxItems": 3,
                                  "items": {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                                            "properties": {"sku": {"type": "string", "maxLength": 6},
                                                           "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}},
                        "express": {"type": "boolean"}}}
NOARGS = {"type": "object", "properties": {}, "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "place_order": ORDER, "ping": NOARGS}
TOOLS_JSON = [{"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": s}}
              for n, s in SCHEMAS.items()]


W_ARGS, O_ARGS = '{"city": "Paris", "unit": "celsius"}', '{"items": [{"sku": "a}\\"[", "qty": 2}], "express": true}'


_TOKENIZER = []


def load_tokenizer_cached():
    if not _TOKENIZER:
        from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint

        _TOKENIZER.append(load_tokenizer(ensure_default_checkpoint(DEFAULT_CHECKPOINT)))
    return _TOKENIZER[0]
