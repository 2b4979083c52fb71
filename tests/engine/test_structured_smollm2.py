"""Structured output with SmolLM2-135M-Instruct: 32 concurrent constrained requests over 8 JSON
schemas (greedy and sampled) plus a choice and a regex request and unconstrained neighbours,
all in one running batch; every output is checked, and the neighbours must not notice."""
import json
import re

import jsonschema
import pytest

from engine import LLMEngine, SamplingParams
from engine.structured_output_params import StructuredOutputsParams as SO

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
# (question, schema): nested objects, arrays, enums, required and optional fields.
CASES = [
    ("Describe a fictional person.",
     {"type": "object", "properties": {"name": NAME,
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120}},
      "required": ["name", "age"]}),
    ("Where is the Eiffel Tower?",
     {"type": "object", "properties": {
         "city": NAME,
         "address": {"type": "object",
                     "properties": {"street": NAME,
                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                     "required": ["street", "zip"]}},
      "required": ["city", "address"]}),
    ("Is the review 'I loved this film' positive or negative?",
     {"type": "object", "properties": {
         "sentiment": {"enum": ["positive", "negative", "neutral"]},
         "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
      "required": ["sentiment", "confidence"]}),
    ("Name up to three primary colors.",
     {"type": "object", "properties": {
         "colors": {"type": "array", "items": {"enum": ["red", "yellow", "blue", "green"]},
                    "minItems": 1, "maxItems": 3}},
      "required": ["colors"]}),
    ("Is water wet? Answer yes or no with a short reason.",
     {"type": "object", "properties": {"answer": {"type": "boolean"}, "reason": NAME},
      "required": ["answer"]}),
    ("Describe a famous book and its authors.",
     {"type": "object", "properties": {
         "book": {"type": "object",
                  "properties": {"title": NAME,
                                 "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
                  "required": ["title", "year"]},
         "authors": {"type": "array", "items": {"type": "object", "properties": {"name": NAME},
                                                "required": ["name"]},
                     "minItems": 1, "maxItems": 2}},
      "required": ["book", "authors"]}),
    ("List a few small prime numbers.",
     {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
      "minItems": 2, "maxItems": 4}),
    ("Tell me about the capital of France.",
     {"type": "object", "properties": {
         "capital": {"enum": ["Paris", "Lyon", "Marseille"]},
         "country": NAME,
         "facts": {"type": "array", "items": NAME, "maxItems": 2}},
      "required": ["capital", "country", "facts"]}),
]
CHOICES = ["Paris", "London", "Berlin"]
DATE = r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]"
PLAIN = ["What is the capital of France?", "Write one sentence about the sea.",
         "Name a color.", "Count to five."]


def chat(tokenizer, question: str, schema: dict | None = None) -> str:
    content = question if schema is None else f"{question} Answer in JSON."
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def collect(llm: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    """Run ``requests`` together, building each result from its streamed step deltas."""
    for rid, (prompt, params) in requests.items():
        llm.add_request(rid, prompt, params)
    got = {rid: {"text": "", "ids": [], "reason": None} for rid in requests}
    while llm.has_unfinished():
        for out in llm.step():
            r = got[out.request_id]
            r["text"] += out.text
            r["ids"] += out.token_ids
            r["reason"] = out.finish_reason
    return got


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLMEngine(smollm2_dir, kv_cache_bytes=256 * 2**20, max_num_seqs=48,
                     max_num_batched_tokens=1024)


def test_32_constrained_requests_beside_unconstrained_ones(llm):
    tok = llm.tokenizer
    plain = {f"plain{i}": (chat(tok, q), SamplingParams(temperature=0, max_tokens=24))
             for i, q in enumerate(PLAIN)}
    requests = dict(plain)
    for i in range(32):
        question, schema = CASES[i % 8]
        sampled = dict(temperature=0.8, top_p=0.95, seed=i) if i >= 16 else dict(temperature=0)
        requests[f"json{i}"] = (chat(tok, question, schema), SamplingParams(
            max_tokens=64, structured_outputs=SO(json=schema), **sampled))
    requests["choice"] = (chat(tok, "What is the capital of France?"), SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=SO(choice=CHOICES)))
    requests["regex"] = (chat(tok, "When did the Berlin wall fall? Give the date."),
                         SamplingParams(temperature=0, max_tokens=16,
                                        structured_outputs=SO(regex=DATE)))
    got = collect(llm, requests)
    assert llm.peak_running >= 38, "all requests must have shared the running batch"
    for i in range(32):
        r = got[f"json{i}"]
        assert r["reason"] == "stop", (i, r)
        assert r["ids"][-1] in llm.eos_token_ids
        jsonschema.validate(json.loads(r["text"]), CASES[i % 8][1])
    assert got["choice"]["reason"] == "stop" and got["choice"]["text"] in CHOICES
    assert got["regex"]["reason"] == "stop" and re.fullmatch(DATE, got["regex"]["text"])
    alone = collect(llm, plain)
    assert {rid: r["ids"] for rid, r in alone.items()} == \
        {rid: got[rid]["ids"] for rid in plain}
    assert llm.allocator.num_used == 0
