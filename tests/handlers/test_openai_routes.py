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
    prompt = offline_engine.tokenizer.encode(offline_engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
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


def test_models_route_has_max_model_len(client, offline_engine):
    [model] = client.models.list().data
    assert model.max_model_len == offline_engine.max_model_len


def test_tokenize_and_detokenize_routes(server, offline_engine):
    """vLLM's shapes: /tokenize takes a prompt or chat messages, /detokenize token ids."""
    url, headers, tok = f"{server.url()}/predictions/llm/1.0", server.headers(), \
        offline_engine.tokenizer
    reply = requests.post(f"{url}/tokenize", json={"model": "llm", "prompt": "Hello world",
                                                   "return_token_strs": True},
                          headers=headers, timeout=60).json()
    ids = tok.encode("Hello world", add_special_tokens=True)
    assert reply == {"count": len(ids), "tokens": ids, "max_model_len":
                     offline_engine.max_model_len, "token_strs": tok.convert_ids_to_tokens(ids)}
    bare = requests.post(f"{url}/tokenize", json={"prompt": "Hello world",
                                                  "add_special_tokens": False},
                         headers=headers, timeout=60).json()
    assert bare["tokens"] == tok.encode("Hello world", add_special_tokens=False)
    assert bare["token_strs"] is None
    messages = [{"role": "user", "content": "Say something"}]
    chat = requests.post(f"{url}/tokenize", json={"messages": messages}, headers=headers,
                         timeout=60).json()
    served = requests.post(f"{url}/v1/chat/completions", json={"messages": messages,
                                                               "max_tokens": 1},
                           headers=headers, timeout=60).json()
    assert chat["count"] == served["usage"]["prompt_tokens"]
    back = requests.post(f"{url}/detokenize", json={"model": "llm", "tokens": ids},
                         headers=headers, timeout=60).json()
    assert back == {"prompt": tok.decode(ids)}
    for route, body, field in [("tokenize", {"prompt": "x", "colour": 1}, "colour"),
                               ("tokenize", {}, "prompt"),
                               ("detokenize", {"tokens": [10**9]}, "tokens"),
                               ("detokenize", {"tokens": "abc"}, "tokens")]:
        bad = requests.post(f"{url}/{route}", json=body, headers=headers, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, bad.text


def test_logit_bias(client):
    plain = client.completions.create(model="llm", prompt="The quick brown fox", max_tokens=5,
                                      temperature=0)
    forced = client.completions.create(model="llm", prompt="The quick brown fox", max_tokens=5,
                                       temperature=0, logit_bias={"7": 100}, logprobs=0)
    assert forced.choices[0].text != plain.choices[0].text
    ids = client.completions.create(model="llm", prompt="x", max_tokens=1, temperature=0,
                                    logit_bias={"7": 100}, extra_body={"ignore_eos": True},
                                    logprobs=0)
    chat = client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, temperature=0, logit_bias={"7": 100},
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == ids.choices[0].text * 3
    assert forced.choices[0].text == ids.choices[0].text * 5
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="llm", prompt="x", logit_bias={"7": 300})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="llm", prompt="x", logit_bias={"99999999": 1})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="llm", prompt="x", suffix="y")
