"""Prompt arrays on ``/v1/completions``: a list of strings or of token-id lists, each prompt's
``n`` choices sequences of one request, indexed prompt-major, through the official openai
client (sync, async, streamed) against the real TorchServe; the limits on prompts and tokens
are 400s naming them."""
import asyncio

import openai
import pytest

from handlers.limits import enforce
from handlers.protocol import RequestError, parse_request
from handlers.settings import HandlerSettings
from tests.handlers.test_logprobs_routes import Tok

PROMPTS = ["The quick brown fox", "Once upon a time there", "1 2 3"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                         api_key=server.inference_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def singles(client) -> list:
    """Each prompt alone, greedy, with echo and logprobs: what every choice must equal."""
    return [client.completions.create(model="llm", prompt=p, max_tokens=12, temperature=0,
                                      logprobs=2, echo=True) for p in PROMPTS]


def _same_choice(got, want) -> None:
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert got.logprobs.tokens == want.logprobs.tokens
    assert got.logprobs.text_offset == want.logprobs.text_offset
    assert got.logprobs.token_logprobs[0] is None and want.logprobs.token_logprobs[0] is None
    assert got.logprobs.token_logprobs[1:] == pytest.approx(want.logprobs.token_logprobs[1:],
                                                            abs=1e-4)


def test_strings_with_n2_equal_single_prompts(client, singles):
    reply = client.completions.create(model="llm", prompt=PROMPTS, n=2, max_tokens=12,
                                      temperature=0, logprobs=2, echo=True)
    assert [c.index for c in reply.choices] == list(range(6))
    for c in reply.choices:
        _same_choice(c, singles[c.index // 2].choices[0])
    assert reply.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert reply.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles)


def test_token_ids_with_n2_equal_single_prompts(client, singles, offline_engine):
    ids = [offline_engine.tokenizer.encode(p) for p in PROMPTS]
    reply = client.completions.create(model="llm", prompt=ids, n=2, max_tokens=12,
                                      temperature=0, logprobs=2, echo=True)
    assert [c.index for c in reply.choices] == list(range(6))
    for c in reply.choices:
        want = singles[c.index // 2].choices[0]
        assert c.logprobs.tokens == want.logprobs.tokens
        assert c.text.endswith(want.text[len(PROMPTS[c.index // 2]):])
    one = client.completions.create(model="llm", prompt=[ids[1]], max_tokens=12, temperature=0)
    assert [c.index for c in one.choices] == [0]
    assert one.choices[0].text == singles[1].choices[0].text[len(PROMPTS[1]):]


def test_streamed_chunks_carry_their_index(client, singles):
    chunks = list(client.completions.create(model="llm", prompt=PROMPTS, n=2, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == sorted(finishes) == list(range(6))
    for i, text in texts.items():
        want = singles[i // 2].choices[0]
        assert PROMPTS[i // 2] + text == want.text and finishes[i] == want.finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_async_client_scores_prompt_arrays(server, client):
    """The loglikelihood shape evaluation harnesses send (echo, logprobs, max_tokens 0),
    several requests at once through the async client."""
    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                                     api_key=server.inference_key, max_retries=0, timeout=120)
        jobs = [aclient.completions.create(model="llm", prompt=PROMPTS[i:] + PROMPTS[:i],
                                           max_tokens=0, echo=True, logprobs=1, temperature=0)
                for i in range(3)]
        return await asyncio.gather(*jobs)
    replies = asyncio.run(run())
    alone = {p: client.completions.create(model="llm", prompt=p, max_tokens=0, echo=True,
                                          logprobs=1) for p in PROMPTS}
    for i, reply in enumerate(replies):
        for choice, prompt in zip(reply.choices, PROMPTS[i:] + PROMPTS[:i]):
            assert choice.text == prompt and choice.finish_reason == "length"
            assert choice.logprobs.token_logprobs[1:] == pytest.approx(
                alone[prompt].choices[0].logprobs.token_logprobs[1:], abs=1e-4)
        assert reply.usage.completion_tokens == 0


def test_limits_are_400s_naming_them(client):
    with pytest.raises(openai.BadRequestError, match="max_prompts"):
        client.completions.create(model="llm", prompt=["x"] * 65, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_request_tokens"):
        client.completions.create(model="llm", prompt=["x"] * 64, n=4, max_tokens=1024)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]: must not be empty"):
        client.completions.create(model="llm", prompt=["x", ""], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="prompt 1: token ids"):
        client.completions.create(model="llm", prompt=[[5, 6], [5, 10**8]], max_tokens=1)
    assert client.completions.create(model="llm", prompt=["x", "y"], max_tokens=1).choices


@pytest.mark.parametrize("prompt, want", [
    ("ab", ["ab"]), ([1, 2], [[1, 2]]), (["ab", "c"], ["ab", "c"]),
    ([[1, 2], [3]], [[1, 2], [3]]), (["ab"], ["ab"]),
])
def test_prompt_shapes(prompt, want):
    req = parse_request({"body": {"prompt": prompt, "echo": True}}, "v1/completions", Tok())
    assert req.prompts == want
    assert req.echo == ["".join(map(chr, p)) if isinstance(p, list) else p for p in want]


@pytest.mark.parametrize("prompt", [[], [[]], [[1], "a"], [["a"]], [[1.5]], ["a", 3]])
def test_bad_prompt_shapes_name_the_prompt(prompt):
    with pytest.raises(RequestError) as err:
        parse_request({"body": {"prompt": prompt}}, "v1/completions", Tok())
    assert err.value.param == "prompt" and err.value.message.startswith("prompt")


def test_enforce_counts_every_prompt_and_choice(tmp_path):
    settings = HandlerSettings(model_path=str(tmp_path), max_prompts=3, max_request_tokens=20)
    req = parse_request({"body": {"prompt": ["abc", "de"], "n": 2, "max_tokens": 3}},
                        "v1/completions", Tok())
    enforce(req, settings, Tok())           # 5 prompt tokens + 2 prompts x 2 choices x 3 = 17
    assert req.prompts == [[97, 98, 99], [100, 101]]
    req = parse_request({"body": {"prompt": ["abc", "de"], "n": 2, "max_tokens": 4}},
                        "v1/completions", Tok())
    with pytest.raises(RequestError, match="come to 21; this server allows 20"):
        enforce(req, settings, Tok())
    req = parse_request({"body": {"prompt": ["a"] * 4}}, "v1/completions", Tok())
    with pytest.raises(RequestError, match="at most 3 prompts"):
        enforce(req, settings, Tok())
