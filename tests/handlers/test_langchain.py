"""langchain-openai's ChatOpenAI against the real TorchServe (tiny model): ``invoke`` and
``stream`` give the chat route's answer, ``bind_tools`` with a forced tool returns a parsed
tool call whose arguments match the function's schema."""
import jsonschema
import pytest

langchain_openai = pytest.importorskip("langchain_openai")

WEATHER = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                            "rain": {"type": "boolean"}},
           "required": ["unit", "rain"]}
TOOL = {"type": "function", "function": {"name": "forecast", "description": "The weather",
                                         "parameters": WEATHER}}


@pytest.fixture(scope="module")
def chat_model(server):
    return langchain_openai.ChatOpenAI(
        model="llm", base_url=f"{server.url()}/predictions/llm/1.0/v1",
        api_key=server.inference_key, temperature=0, max_tokens=12, max_retries=0, timeout=120)


def test_invoke_and_stream_agree(chat_model, http, llm_url):
    question = "Say something"
    reply = chat_model.invoke(question)
    raw = http.post(f"{llm_url}/1.0/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": question}], "max_tokens": 12,
        "temperature": 0}).json()
    assert reply.content == raw["choices"][0]["message"]["content"]
    assert reply.usage_metadata["output_tokens"] == raw["usage"]["completion_tokens"]
    assert "".join(chunk.content for chunk in chat_model.stream(question)) == reply.content


def test_bind_tools_with_a_forced_call(chat_model):
    bound = chat_model.bind_tools([TOOL], tool_choice="forecast")
    message = bound.invoke("Will it rain?", max_tokens=64)
    [call] = message.tool_calls
    assert call["name"] == "forecast" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER)
    streamed = None
    for chunk in bound.stream("Will it rain?", max_tokens=64):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("forecast", call["args"])]
