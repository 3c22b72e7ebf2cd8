"""The client libraries people put in front of a local server, against the shared tiny tool-capable
server: LangChain's ``bind_tools`` (tool_choice required and named) and
``with_structured_output(method="function_calling")``, litellm's ``completion(..., tools=...)``,
instructor's tools mode (whole and streamed partials) and pydantic-ai's structured output (its
``final_result`` tool). All run offline (litellm with its bundled cost map; no path here needs tiktoken's downloads)."""

from __future__ import annotations

import json
import os
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from .tool_ckpt import shared_tool_server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the model cost map


class GetWeather(BaseModel):
    """The forecast for a city."""

    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)


class PlaceOrder(BaseModel):
    """Order an item."""

    item: str = Field(max_length=8)
    rush: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_ckpt):
    return shared_tool_server(tmp_path_factory, real_ckpt)


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(model="tiny-tools", base_url=f"http://{server.http_address}/v1",
                                       api_key="unused", max_tokens=120, temperature=1.0, seed=7, max_retries=0)


def test_langchain_bind_tools_required_and_named(chat_model):
    for choice, names in [("required", {"GetWeather", "PlaceOrder"}), ("PlaceOrder", {"PlaceOrder"})]:
        msg = chat_model.bind_tools([GetWeather, PlaceOrder], tool_choice=choice,
                                    parallel_tool_calls=False).invoke("What is the weather in Oslo?")
        assert len(msg.tool_calls) == 1 and not msg.invalid_tool_calls
        call = msg.tool_calls[0]
        assert call["name"] in names
        model = {"GetWeather": GetWeather, "PlaceOrder": PlaceOrder}[call["name"]]
        model.model_validate(call["args"])  # the arguments validate against the tool's schema


def test_langchain_structured_output_by_function_calling(chat_model):
    got = chat_model.with_structured_output(GetWeather, method="function_calling").invoke("Weather in Lima?")
    assert isinstance(got, GetWeather) and 1 <= got.days <= 7


def test_litellm_completion_with_tools(server):
    litellm = pytest.importorskip("litellm")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast.",
                                               "parameters": GetWeather.model_json_schema()}}]
    r = litellm.completion(model="openai/tiny-tools", api_base=f"http://{server.http_address}/v1", api_key="unused",
                           messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                           tool_choice="required", parallel_tool_calls=False, max_tokens=120, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), GetWeather.model_json_schema())


def test_instructor_tools_mode_whole_and_streamed_partials(server):
    """instructor's default mode forces a named tool call, whole and streamed (its ``Partial`` model)."""
    instructor = pytest.importorskip("instructor")
    import openai

    client = instructor.from_openai(openai.OpenAI(base_url=f"http://{server.http_address}/v1", api_key="unused",
                                                  max_retries=0), mode=instructor.Mode.TOOLS)
    kw = dict(model="tiny-tools", messages=[{"role": "user", "content": "Weather in Oslo?"}], max_tokens=120,
              seed=7, max_retries=0)
    got, raw = client.chat.completions.create_with_completion(response_model=GetWeather, **kw)
    assert isinstance(got, GetWeather) and 1 <= got.days <= 7
    call = raw.choices[0].message.tool_calls[0]
    assert raw.choices[0].finish_reason == "tool_calls" and call.function.name == "GetWeather"
    assert GetWeather.model_validate_json(call.function.arguments).model_dump() == got.model_dump()
    partials = list(client.chat.completions.create_partial(response_model=GetWeather, **kw))
    assert len(partials) > 1 and partials[0].city is None  # the object grows as the call's arguments stream
    GetWeather.model_validate(partials[-1].model_dump())  # and ends complete and valid


def test_pydantic_ai_structured_output(server):
    """pydantic-ai's default output mode: a ``final_result`` tool with tool_choice required."""
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, ToolCallPart
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("tiny-tools", provider=OpenAIProvider(base_url=f"http://{server.http_address}/v1",
                                                                  api_key="unused"))
    agent = Agent(model, output_type=GetWeather, model_settings={"max_tokens": 120, "seed": 7}, retries=0)
    result = agent.run_sync("Weather in Lima?")
    assert isinstance(result.output, GetWeather)
    replies = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    assert len(replies) == 1  # no retry: the first reply's call validated
    calls = [p for p in replies[0].parts if isinstance(p, ToolCallPart)]
    assert calls and calls[0].tool_name == "final_result"
    assert GetWeather.model_validate_json(calls[0].args).model_dump() == result.output.model_dump()
