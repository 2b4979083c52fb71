"""Structured output from SmolLM2-135M-Instruct served by a real TorchServe: 16 concurrent
requests over the 8 JSON schemas, native route streamed (NDJSON, ``structured_outputs``) and
OpenAI chat whole (``response_format``), greedy and sampled, beside a choice streamed as SSE;
every output validates against its schema."""
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import requests
from transformers import AutoTokenizer

from scripts.build_archives import build_all
from scripts.serve import free_ports, start_server, stop_server
from tests.engine.test_structured_smollm2 import CASES, CHOICES, chat


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("structured-archives")
    build_all(out=store, llm_path=smollm2_dir, names=("llm",))
    run_dir = tmp_path_factory.mktemp("structured-torchserve")
    yield start_server(store, models=("llm",), run_dir=run_dir, ports=free_ports(),
                       timeout_s=240)
    stop_server(run_dir)


def native_streamed(url: str, headers: dict, prompt: str, schema: dict,
                    sampling: dict) -> tuple[str, str]:
    body = {"prompt": prompt, "max_tokens": 64, "stream": True,
            "structured_outputs": {"json": schema}} | sampling
    with requests.post(url, json=body, headers=headers, stream=True, timeout=300) as reply:
        assert reply.status_code == 200, reply.text
        events = [json.loads(line) for line in reply.iter_lines() if line]
    return "".join(e["text"] for e in events), events[-1]["finish_reason"]


def chat_whole(url: str, headers: dict, question: str, schema: dict,
               sampling: dict) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": f"{question} Answer in JSON."}],
            "max_tokens": 64, "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": schema}}} | sampling
    reply = requests.post(f"{url}/1.0/v1/chat/completions", json=body, headers=headers,
                          timeout=300)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def chat_streamed_choice(url: str, headers: dict) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0, "stream": True,
            "structured_outputs": {"choice": CHOICES}}
    with requests.post(f"{url}/1.0/v1/chat/completions", json=body, headers=headers,
                       stream=True, timeout=300) as reply:
        assert reply.status_code == 200, reply.text
        events = [json.loads(line[len(b"data: "):]) for line in reply.iter_lines()
                  if line.startswith(b"data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    return text, events[-1]["choices"][0]["finish_reason"]


def test_concurrent_constrained_requests_streamed_and_whole(server, smollm2_dir):
    url, headers = f"{server.url()}/predictions/llm", server.headers()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    with ThreadPoolExecutor(17) as pool:
        jobs = []
        for i, (question, schema) in enumerate(CASES):
            sampling = {"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i}
            jobs.append((schema, pool.submit(native_streamed, url, headers,
                                             chat(tokenizer, question, schema), schema,
                                             sampling)))
            jobs.append((schema, pool.submit(chat_whole, url, headers, question, schema,
                                             {"temperature": 0.8, "seed": i} if i % 2
                                             else {"temperature": 0})))
        choice = pool.submit(chat_streamed_choice, url, headers)
        for schema, job in jobs:
            text, reason = job.result()
            assert reason == "stop", text
            jsonschema.validate(json.loads(text), schema)
        assert choice.result() in [(c, "stop") for c in CHOICES]
