"""Tool calling without a server: tools and tool_choice checked, the grammars of required and
named calls, the auto parser on given model text (hermes and Llama 3 forms), streamed deltas,
and how tools and tool-call history reach a chat template."""
import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from engine.structured_output_params import parse
from handlers.protocol import RequestError, parse_request


def text_of(req, tokenizer) -> str:
    return tokenizer.decode(req.prompts[0], skip_special_tokens=False)
from handlers.tool_calls import ToolCallStream, parse_tools

CHAT = "v1/chat/completions"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def chat(body, tokenizer=None):
    return parse_request({"body": {"messages": MESSAGES} | body}, CHAT, tokenizer)


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": "a"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_are_400_naming_the_field(body, param):
    with pytest.raises(RequestError) as err:
        chat(body)
    assert err.value.status == 400 and err.value.param == param, err.value.message
    assert err.value.message.startswith(param)


def test_tool_choice_sets_the_grammar():
    assert chat({"tools": TOOLS}).params.structured_outputs is None
    assert chat({"tools": TOOLS}).tools.choice == "auto"
    assert chat({"tools": TOOLS, "tool_choice": "none"}).tools is None
    named = chat({"tools": TOOLS, "tool_choice": {"type": "function",
                                                   "function": {"name": "get_weather"}}})
    assert named.params.structured_outputs.json_schema == WEATHER
    required = chat({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    schema = required.params.structured_outputs.json_schema
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    parse(*required.params.structured_outputs.key())       # xgrammar compiles it
    calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]
    jsonschema.validate(calls, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "arguments": {"city": "x", "unit": "c"}}], schema)


def _tools(choice="auto", parallel=None):
    return parse_tools(TOOLS, choice, parallel)


def test_auto_parses_hermes_and_llama3_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    content, calls = _tools().parse(text)
    assert content == "Let me check.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("now", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert len(_tools(parallel=False).parse(text)[1]) == 1
    unterminated = '<tool_call>{"name": "now", "arguments": {}}'
    assert _tools().parse(unterminated)[0] is None and len(_tools().parse(unterminated)[1]) == 1
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}'
    content, calls = _tools().parse(llama)
    assert content is None and json.loads(calls[0]["function"]["arguments"])["city"] == "Oslo"
    two = '{"name": "now", "parameters": {}}; {"name": "now", "parameters": {}}'
    assert len(_tools().parse(two)[1]) == 2


@pytest.mark.parametrize("text", [
    "It is sunny in Paris.", '{"city": "Paris"}', '<tool_call>{"name": "nope", "arguments": {}}',
    '<tool_call>{"name": "now", "arguments": {</tool_call>', '{"name": "now"} trailing',
])
def test_auto_leaves_text_without_a_valid_call_as_content(text):
    assert _tools().parse(text) == (text, [])


def test_required_and_named_outputs():
    content, calls = _tools("required").parse('[{"name": "now", "arguments": {}}]')
    assert content is None and calls[0]["function"] == {"name": "now", "arguments": "{}"}
    assert _tools("required").parse('[{"name": "now", "argu') == ('[{"name": "now", "argu', [])
    named = _tools({"type": "function", "function": {"name": "get_weather"}})
    content, calls = named.parse('{"city": "Rome", "unit": "c"}')
    assert calls[0]["function"] == {"name": "get_weather",
                                    "arguments": '{"city": "Rome", "unit": "c"}'}


def _stream(tools, deltas):
    stream, content, calls = ToolCallStream(tools), [], []
    for d in deltas:
        text, more = stream.feed(d)
        content.append(text)
        calls += more
    text, more = stream.finish()
    return "".join(content) + text, calls + more, stream.num_calls


def test_stream_auto_sends_content_then_the_calls():
    deltas = ["Sure", ". <tool", "_call>", '{"name": "now", ', '"arguments": {}}', "</tool_call>"]
    content, calls, num = _stream(_tools(), deltas)
    assert content == "Sure. " and num == 1
    assert calls[0]["index"] == 0 and calls[0]["function"] == {"name": "now", "arguments": "{}"}
    held = ToolCallStream(_tools())
    assert held.feed("Hi <tool")[0] == "Hi " and held.feed(" no")[0] == "<tool no"
    assert _stream(_tools(), ["<", "tool"]) == ("<tool", [], 0)
    assert _stream(_tools(), ['{"a"', ": 1}"]) == ('{"a": 1}', [], 0)


def test_stream_named_sends_arguments_as_they_come():
    named = _tools({"type": "function", "function": {"name": "get_weather"}})
    content, calls, num = _stream(named, ['{"city"', ': "Rome", "unit": "c"}'])
    assert content == "" and num == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert calls[0]["id"].startswith("call_") and "id" not in calls[1]
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Rome", "unit": "c"}'
    content, calls, num = _stream(_tools("required"), ['[{"name": "now", ', '"arguments": {}}]'])
    assert content == "" and num == 1 and calls[0]["function"]["name"] == "now"


HISTORY = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]


def test_history_and_tools_in_a_template_without_tools(tiny_llama):
    """The tiny model's template never mentions tools: they are written out hermes-style."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    req = parse_request({"body": {"messages": HISTORY, "tools": TOOLS}}, CHAT, tokenizer)
    prompt = text_of(req, tokenizer)
    assert prompt.index("<tools>") < prompt.index('"name": "get_weather"') < prompt.index(
        "Weather in Paris?")
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
            '\n</tool_call>') in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    plain = text_of(parse_request({"body": {"messages": MESSAGES}}, CHAT, tokenizer), tokenizer)
    assert "<tools>" not in plain


def test_history_and_tools_in_a_template_that_renders_them(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}|"
        "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
        "{{ c.function.arguments.city }}{% endfor %}|{% endfor %}")
    req = parse_request({"body": {"messages": HISTORY, "tools": TOOLS}}, CHAT, tokenizer)
    assert req.prompts[0] == tokenizer.encode(
        "TOOLS get_weather,now|user: Weather in Paris?|assistant: CALL get_weather Paris|"
        "tool: 18 C, sunny|", add_special_tokens=False)
    bad = HISTORY[:1] + [{"role": "assistant", "tool_calls": [{
        "type": "function", "function": {"name": "now", "arguments": "[1]"}}]}]
    with pytest.raises(RequestError) as err:
        parse_request({"body": {"messages": bad}}, CHAT, tokenizer)
    assert err.value.param == "messages[1].tool_calls[0].function.arguments"
