"""Tool calls through the real TorchServe with the official openai client (tiny model):
``required`` and a named function are grammar-enforced, so any model calls them with valid
arguments; ``auto`` is driven end to end by forcing a hermes-style call with a regex, which the
parser then reads; streamed deltas assemble into the same calls; history with tool calls and
tool results is accepted; bad tools are 400s."""
import asyncio
import json

import jsonschema
import openai
import pytest

FORECAST = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                             "rain": {"type": "boolean"}},
            "required": ["unit", "rain"]}
TOOLS = [{"type": "function", "function": {"name": "forecast", "description": "The weather",
                                           "parameters": FORECAST}},
         {"type": "function", "function": {"name": "clock", "description": "The time"}}]
ASK = [{"role": "user", "content": "Will it rain?"}]
NAMED = {"type": "function", "function": {"name": "forecast"}}
HERMES = (r'<tool_call>\{"name": "forecast", "arguments": \{"unit": "(c|f)", '
          r'"rain": (true|false)\}\}</tool_call>')


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                         api_key=server.inference_key, max_retries=0, timeout=120)


def _create(client, **kw):
    return client.chat.completions.create(**{"model": "llm", "messages": ASK, "tools": TOOLS,
                                             "max_tokens": 64, "temperature": 0} | kw)


def _assembled(chunks) -> tuple[str, list[dict], str]:
    """Content, tool calls (OpenAI's delta-merge rule: by index) and finish of a stream."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or d.id
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_calls_a_tool_with_valid_arguments(client):
    reply = _create(client, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.id.startswith("call_") and c.type == "function" for c in calls)
    for call in calls:
        schema = FORECAST if call.function.name == "forecast" else {"type": "object",
                                                                   "maxProperties": 0}
        jsonschema.validate(json.loads(call.function.arguments), schema)
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    single = _create(client, tool_choice="required", parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_function_whole_and_streamed(client):
    whole = _create(client, tool_choice=NAMED).choices[0]
    assert whole.finish_reason == "tool_calls"
    [call] = whole.message.tool_calls
    assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), FORECAST)
    chunks = list(_create(client, tool_choice=NAMED, stream=True,
                          stream_options={"include_usage": True}))
    content, calls, finish = _assembled(chunks)
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("forecast", call.function.arguments)]
    assert calls[0]["id"].startswith("call_")
    assert chunks[-1].usage.completion_tokens > 0


def test_auto_reads_the_models_call_whole_and_streamed(client):
    forced = {"structured_outputs": {"regex": HERMES}, "max_tokens": 200}
    whole = _create(client, extra_body=forced).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [call] = whole.message.tool_calls
    assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), FORECAST)
    content, calls, finish = _assembled(_create(client, extra_body=forced, stream=True))
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("forecast", json.loads(call.function.arguments))]
    plain = _create(client, max_tokens=8).choices[0]        # the tiny model writes no call
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")
    content, calls, finish = _assembled(_create(client, max_tokens=8, stream=True))
    assert (content, calls, finish) == (plain.message.content, [], plain.finish_reason)
    none = client.chat.completions.create(model="llm", messages=ASK, tools=TOOLS,
                                          tool_choice="none", max_tokens=8, temperature=0)
    bare = client.chat.completions.create(model="llm", messages=ASK, max_tokens=8,
                                          temperature=0)
    assert none.choices[0].message.content == bare.choices[0].message.content


def test_history_with_tool_calls_and_results(server, client):
    first = _create(client, tool_choice=NAMED).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": first.tool_calls[0].id,
                      "content": "light rain, 12 C"}]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                                     api_key=server.inference_key, max_retries=0, timeout=120)
        return await asyncio.gather(*[aclient.chat.completions.create(
            model="llm", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
            for _ in range(2)])
    replies = asyncio.run(run())
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].usage.prompt_tokens > _create(client, max_tokens=1).usage.prompt_tokens


def test_bad_tools_are_400s(client):
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "bogus"}}}}}]
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]\.function\.parameters"):
        client.chat.completions.create(model="llm", messages=ASK, tools=bad_schema)
    with pytest.raises(openai.BadRequestError, match="'nope' is not in tools"):
        _create(client, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tools: not supported"):
        client.completions.create(model="llm", prompt="x", extra_body={"tools": TOOLS})
