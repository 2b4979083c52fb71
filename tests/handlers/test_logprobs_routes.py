"""Logprobs, echo / prompt scoring, n and best_of on the OpenAI and native routes.

Parsing and rendering are checked without a server; then the openai client parses n > 1
streams and logprobs (chat and completions) through the real TorchServe, against the same
engine run in-process.
"""
import json

import openai
import pytest
import requests

from engine import RequestOutput, SamplingParams
from engine.logprobs import Logprob, PositionLogprobs
from handlers.framing import Framer
from handlers.protocol import RequestError, parse_request

CHAT = "v1/chat/completions"
COMPLETIONS = "v1/completions"
MESSAGES = [{"role": "user", "content": "x"}]


class Tok:
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def parse(body, path, **kw):
    return parse_request({"body": body}, path, Tok(), **kw)


def test_completions_fields_map_to_sampling_params():
    req = parse({"prompt": "abc", "logprobs": 3, "echo": True, "n": 2, "best_of": 4}, COMPLETIONS)
    p = req.params
    assert (p.logprobs, p.prompt_logprobs, p.n, p.best_of) == (3, 3, 2, 4)
    assert req.echo == ["abc"] and req.echo_first_token == ["a"]
    scoring = parse({"prompt": [97, 98], "echo": True, "max_tokens": 0, "logprobs": 1},
                    COMPLETIONS)
    assert scoring.params.max_tokens == 0 and scoring.params.prompt_logprobs == 1
    assert scoring.echo == ["ab"]
    quiet = parse({"prompt": "abc", "echo": True, "max_tokens": 0}, COMPLETIONS)
    assert quiet.params.logprobs is None and quiet.params.prompt_logprobs == 0
    plain = parse({"prompt": "abc"}, COMPLETIONS)
    assert plain.echo is None and plain.params.logprobs is None and plain.params.n == 1


def test_chat_fields_map_to_sampling_params():
    req = parse({"messages": MESSAGES, "logprobs": True, "top_logprobs": 5, "n": 3}, CHAT)
    assert (req.params.logprobs, req.params.n, req.params.prompt_logprobs) == (5, 3, None)
    assert parse({"messages": MESSAGES, "logprobs": True}, CHAT).params.logprobs == 0
    assert parse({"messages": MESSAGES, "logprobs": False}, CHAT).params.logprobs is None


def test_native_route_takes_vllm_names():
    req = parse({"prompt": "x", "n": 2, "logprobs": 1, "prompt_logprobs": 0, "seed": 3}, "")
    assert (req.params.n, req.params.logprobs, req.params.prompt_logprobs) == (2, 1, 0)


@pytest.mark.parametrize("path, body, field", [
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "logprobs": True}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "n": 1, "best_of": 2, "stream": True}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "n": 9}, "n"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "max_tokens": 0, "n": 2}, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "logprobs": 3}, "logprobs"),
    ("", {"prompt": "x", "prompt_logprobs": 50}, "prompt_logprobs"),
    ("", {"prompt": "x", "best_of": 3, "n": 2, "stream": True}, "best_of"),
])
def test_bad_values_are_400_naming_the_field(path, body, field):
    with pytest.raises(RequestError) as err:
        parse(body, path, max_choices=8)
    assert err.value.status == 400 and err.value.param == field
    assert err.value.message.startswith(field)


def _pos(token: int, lp: float, top: list[tuple[int, float]]) -> PositionLogprobs:
    return PositionLogprobs(Logprob(token, lp, 1, chr(token)),
                            [Logprob(t, v, i + 1, chr(t)) for i, (t, v) in enumerate(top)])


def _events(body: str) -> list[dict]:
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_stream_renders_each_choice_with_its_index_and_finish():
    params = SamplingParams(n=2, logprobs=1)
    framer = Framer("completions", True, True, "r", "llm", params, echo=["ab"],
                    echo_first_token=["a"])
    prompt = [None, _pos(98, -1.5, [(99, -0.5)])]
    first = [RequestOutput("r", "c", [99], None, 2, 1, index=0, choices_running=2,
                           logprobs=[_pos(99, -0.25, [(99, -0.25)])], prompt_logprobs=prompt),
             RequestOutput("r", "d", [100], "stop", 2, 1, index=1, choices_running=1,
                           logprobs=[_pos(100, -2.0, [(99, -0.1)])])]
    stream = type("S", (), dict(finished=False, error=None, finish_reason=None,
                                prompt_tokens=2, completion_tokens=2))()
    events = _events(framer.chunk(first, stream) + "data: [DONE]\n\n")
    assert [(e["choices"][0]["index"], e["choices"][0]["text"],
             e["choices"][0]["finish_reason"]) for e in events] == [(0, "abc", None),
                                                                   (1, "abd", None),
                                                                   (1, "", "stop")]
    echoed = events[0]["choices"][0]["logprobs"]
    assert echoed["tokens"] == ["a", "b", "c"] and echoed["token_logprobs"] == [None, -1.5, -0.25]
    assert echoed["top_logprobs"] == [None, {"c": -0.5, "b": -1.5}, {"c": -0.25}]
    assert echoed["text_offset"] == [0, 1, 2]
    assert events[1]["choices"][0]["logprobs"]["top_logprobs"] == [
        None, {"c": -0.5, "b": -1.5}, {"c": -0.1, "d": -2.0}]
    stream.finished, stream.finish_reason, stream.completion_tokens = True, "length", 3
    last = [RequestOutput("r", "e", [101], "length", 2, 2, index=0,
                          logprobs=[_pos(101, float("-inf"), [])])]
    events = _events(framer.chunk(last, stream))
    assert events[0]["choices"][0]["logprobs"] == {"tokens": ["e"], "token_logprobs": [-9999.0],
                                                   "top_logprobs": [{"e": -9999.0}],
                                                   "text_offset": [3]}
    assert events[1]["choices"][0]["finish_reason"] == "length"
    assert events[2]["usage"]["completion_tokens"] == 3 and events[2]["choices"] == []


def test_whole_replies_list_every_choice():
    params = SamplingParams(n=2, logprobs=0)
    history = [RequestOutput("r", "x", [120], None, 1, 1, index=0, choices_running=2,
                             logprobs=[_pos(120, -1.0, [])]),
               RequestOutput("r", "y", [121], "stop", 1, 1, index=1, choices_running=1,
                             logprobs=[_pos(121, -2.0, [])]),
               RequestOutput("r", "z", [122], "length", 1, 2, index=0,
                             logprobs=[_pos(122, -3.0, [])])]
    stream = type("S", (), dict(finished=True, error=None, finish_reason="length",
                                prompt_tokens=1, completion_tokens=3, history=history,
                                text=["x", "y", "z"], token_ids=[120, 121, 122]))()
    chat = json.loads(Framer("chat", False, False, "r", "llm", params).whole(stream))
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in chat["choices"]] \
        == [(0, "xz", "length"), (1, "y", "stop")]
    assert [t["logprob"] for t in chat["choices"][0]["logprobs"]["content"]] == [-1.0, -3.0]
    assert chat["choices"][0]["logprobs"]["content"][0] == {"token": "x", "logprob": -1.0,
                                                             "bytes": [120], "top_logprobs": []}
    assert chat["usage"]["completion_tokens"] == 3
    native = json.loads(Framer("generate", False, False, "r", "llm", params).whole(stream))
    assert [(o["index"], o["text"], o["token_ids"], o["finish_reason"])
            for o in native["outputs"]] == [(0, "xz", [120, 122], "length"),
                                            (1, "y", [121], "stop")]
    assert native["outputs"][1]["logprobs"][0]["token_id"] == 121


# --- through TorchServe --------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                         api_key=server.inference_key, max_retries=0, timeout=60)


def _close(got: float, want: float) -> bool:
    return abs(got - want) < 1e-4


def test_completions_n_stream_with_logprobs(server, client, offline_engine):
    prompt = "The quick brown fox"
    want = offline_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.9,
                                                            seed=21, n=3, logprobs=2,
                                                            ignore_eos=True), use_tqdm=False)
    chunks = list(client.completions.create(
        model="llm", prompt=prompt, max_tokens=8, temperature=0.9, seed=21, n=3, logprobs=2,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts, tokens, lps = {}, {}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs:
                tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
                lps.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
                assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    assert sorted(texts) == [0, 1, 2]
    for w in want:
        assert texts[w.index] == w.text
        assert tokens[w.index] == [p.token.text for p in w.logprobs]
        assert all(_close(g, p.token.logprob) for g, p in zip(lps[w.index], w.logprobs))
    finishes = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices
                if ch.finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")]
    assert chunks[-1].usage.completion_tokens == 3 * 8


def test_chat_n_stream_with_top_logprobs(server, client, offline_engine):
    messages = [{"role": "user", "content": "Say something"}]
    prompt = offline_engine.tokenizer.encode(offline_engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    want = offline_engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, n=2,
                                                            logprobs=3), use_tqdm=False)
    chunks = list(client.chat.completions.create(
        model="llm", messages=messages, max_tokens=6, temperature=0, n=2, logprobs=True,
        top_logprobs=3, stream=True))
    content, entries, roles = {}, {}, {}
    for c in chunks:
        for ch in c.choices:
            content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
            roles.setdefault(ch.index, ch.delta.role)
            if ch.logprobs and ch.logprobs.content:
                entries.setdefault(ch.index, []).extend(ch.logprobs.content)
    assert roles == {0: "assistant", 1: "assistant"}
    for w in want:
        assert content[w.index] == w.text
        got = entries[w.index]
        assert [e.token for e in got] == [p.token.text for p in w.logprobs]
        for e, p in zip(got, w.logprobs):
            assert _close(e.logprob, p.token.logprob) and len(e.top_logprobs) == 3
            assert [t.token for t in e.top_logprobs] == [t.text for t in p.top]
    whole = client.chat.completions.create(model="llm", messages=messages, max_tokens=6,
                                           temperature=0, n=2, logprobs=True, top_logprobs=1)
    assert [c.message.content for c in whole.choices] == [w.text for w in want]
    assert whole.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert all(len(c.logprobs.content) == len(w.token_ids) for c, w in zip(whole.choices, want))


def test_completions_echo_scores_the_prompt(server, client, offline_engine):
    prompt = "Once upon a time there was"
    want = offline_engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2),
                                   use_tqdm=False)[0]
    reply = client.completions.create(model="llm", prompt=prompt, max_tokens=0, echo=True,
                                      logprobs=2)
    choice = reply.choices[0]
    assert choice.text == prompt and reply.usage.completion_tokens == 0
    assert reply.usage.prompt_tokens == want.prompt_tokens
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == want.prompt_tokens
    assert all(_close(g, p.token.logprob) for g, p in zip(lp.token_logprobs[1:],
                                                           want.prompt_logprobs[1:]))
    assert lp.tokens[1:] == [p.token.text for p in want.prompt_logprobs[1:]]
    echoed = client.completions.create(model="llm", prompt=prompt, max_tokens=4, echo=True,
                                       temperature=0)
    tail = offline_engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0),
                                   use_tqdm=False)[0]
    assert echoed.choices[0].text == prompt + tail.text and echoed.choices[0].logprobs is None


def test_best_of_whole_reply(server, client, offline_engine):
    prompt = "Hello there"
    params = dict(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    want = offline_engine.generate([prompt], SamplingParams(n=2, best_of=4, **params),
                                   use_tqdm=False)
    reply = client.completions.create(model="llm", prompt=prompt, n=2, best_of=4,
                                      max_tokens=6, temperature=1.0, seed=5,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in reply.choices] == [w.text for w in want]
    assert [c.index for c in reply.choices] == [0, 1]


def test_native_route_n_and_logprobs(server, llm_url, offline_engine):
    body = {"prompt": "Hi", "max_tokens": 5, "temperature": 0, "n": 2, "logprobs": 1,
            "prompt_logprobs": 1, "stream": True}
    reply = requests.post(llm_url, json=body, headers=server.headers(), timeout=60)
    assert reply.status_code == 200
    lines = [json.loads(x) for x in reply.text.splitlines() if x]
    want = offline_engine.generate(["Hi"], SamplingParams(max_tokens=5, temperature=0, n=2,
                                                          logprobs=1, prompt_logprobs=1),
                                   use_tqdm=False)
    for w in want:
        mine = [x for x in lines if x.get("index") == w.index]
        assert sum((x["token_ids"] for x in mine), []) == w.token_ids
        assert [e["logprob"] for x in mine for e in x.get("logprobs", [])] == pytest.approx(
            [p.token.logprob for p in w.logprobs], abs=1e-4)
    prompt_lines = [x for x in lines if "prompt_logprobs" in x]
    assert len(prompt_lines) == 1 and prompt_lines[0]["prompt_logprobs"][0] is None
    assert lines[-1]["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
    bad = requests.post(llm_url, json={"prompt": "Hi", "logprobs": 99},
                        headers=server.headers(), timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"
