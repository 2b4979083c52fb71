"""OpenAI-compatible routes (TorchServe extra path segments), parsed by the openai client."""
import json

import openai
import pytest
import requests

from engine import SamplingParams


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                         api_key=server.inference_key, max_retries=0, timeout=60)


def test_models_route(client):
    assert [m.id for m in client.models.list()] == ["llm"]


def test_completions_stream_matches_offline(client, offline_engine):
    prompt = "The quick brown fox"
    want = offline_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    chunks = list(client.completions.create(model="llm", prompt=prompt, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    whole = client.completions.create(model="llm", prompt=prompt, max_tokens=20, temperature=0)
    assert whole.choices[0].text == want.text
    assert whole.usage.prompt_tokens == want.prompt_tokens


def test_chat_stream(client, offline_engine):
    messages = [{"role": "user", "content": "Say something"}]
    chunks = list(client.chat.completions.create(model="llm", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    prompt = offline_engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
    want = offline_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    assert text == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sse_wire_format(server):
    url = f"{server.url()}/predictions/llm/1.0/v1/completions"
    reply = requests.post(url, json={"model": "llm", "prompt": "Hi", "max_tokens": 5,
                                     "stream": True}, headers=server.headers(), timeout=60)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: "):])["object"] == "text_completion"


def test_openai_errors_are_4xx(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="llm", prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="llm", messages=[])
