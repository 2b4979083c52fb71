"""Structured output through a real TorchServe (tiny model): the native ``structured_outputs``
field and OpenAI's ``response_format``, streamed and whole, and 400s naming the bad field."""
import json
import re

import jsonschema
import openai
import pytest
import requests

from handlers.protocol import RequestError, parse_request

SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9},
                         "pet": {"enum": ["cat", "dog"]}},
          "required": ["ok", "n", "pet"]}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                         api_key=server.inference_key, max_retries=0, timeout=60)


def ndjson(reply: requests.Response) -> list[dict]:
    assert reply.status_code == 200, reply.text
    return [json.loads(line) for line in reply.text.splitlines() if line]


def test_native_route_streamed_and_whole(http, llm_url):
    body = {"prompt": "an answer", "max_tokens": 64, "temperature": 0,
            "structured_outputs": {"json": SCHEMA}}
    events = ndjson(http.post(llm_url, json=body | {"stream": True}, timeout=60))
    whole = http.post(llm_url, json=body, timeout=60).json()
    streamed = "".join(e["text"] for e in events)
    assert events[-1]["finish_reason"] == whole["finish_reason"] == "stop"
    assert streamed == whole["text"]
    jsonschema.validate(json.loads(streamed), SCHEMA)
    choice = http.post(llm_url, json={"prompt": "pick", "max_tokens": 16, "temperature": 0.9,
                                      "seed": 3, "structured_outputs": {"choice": ["up", "down"]}},
                       timeout=60).json()
    assert choice["text"] in ("up", "down") and choice["finish_reason"] == "stop"


def test_openai_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    messages = [{"role": "user", "content": "Answer in JSON"}]
    reply = client.chat.completions.create(model="llm", messages=messages, max_tokens=64,
                                           temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="llm", messages=messages, max_tokens=64,
                                                 temperature=0, response_format=fmt,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    regex = client.completions.create(model="llm", prompt="code", max_tokens=16, temperature=0,
                                      extra_body={"structured_outputs": {"regex": "[a-f]{4}"}})
    assert re.fullmatch("[a-f]{4}", regex.choices[0].text)


def test_json_object_is_an_object_or_its_start(client):
    reply = client.completions.create(model="llm", prompt="{", max_tokens=8, temperature=0,
                                      extra_body={"response_format": {"type": "json_object"}})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)
    else:
        assert choice.finish_reason == "length" and choice.text.startswith("{")


@pytest.mark.parametrize("route, body, field", [
    ("", {"prompt": "x", "structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ("", {"prompt": "x", "structured_outputs": {"json": {"type": "nope"}}},
     "structured_outputs.json"),
    ("", {"prompt": "x", "structured_outputs": {"grammar": "root ::= nothing"}},
     "structured_outputs.grammar"),
    ("", {"prompt": "x", "structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ("/1.0/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": {"type": "object",
                                                              "required": "a"}}}},
     "response_format.json_schema.schema"),
    ("/1.0/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}},
     "response_format.type"),
])
def test_invalid_constraint_is_400_naming_the_field(http, llm_url, route, body, field):
    reply = http.post(llm_url + route, json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(field)


def parse_openai(body: dict, route: str = "v1/chat/completions"):
    messages = {"messages": [{"role": "user", "content": "x"}]}
    return parse_request({"body": messages | body}, route, tokenizer=None).params


def test_response_format_maps_onto_structured_outputs():
    assert parse_openai({"response_format": None}).structured_outputs is None
    assert parse_openai({"response_format": {"type": "text"}}).structured_outputs is None
    assert parse_openai({"response_format": {"type": "json_object"}}).structured_outputs.key() \
        == ("json", '{"type": "object"}')
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    assert parse_openai({"response_format": fmt}).structured_outputs.json_schema == SCHEMA
    assert parse_openai({"structured_outputs": {"regex": "a+"}}).structured_outputs.regex == "a+"
    with pytest.raises(RequestError) as err:
        parse_openai({"response_format": fmt, "structured_outputs": {"regex": "a"}})
    assert err.value.param == "response_format"
