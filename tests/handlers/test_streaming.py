"""Streaming through a real TorchServe: incremental chunks, 16 concurrent greedy streams that
match the offline engine token for token, static models and bad requests alongside them."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from engine import SamplingParams

PROMPTS = [f"Request {i}: tell me about the number {i * 7} and the colour {c}"
           for i, c in enumerate(["red", "green", "blue", "amber"] * 4)]


def stream(url: str, headers: dict, body: dict) -> tuple[list[dict], list[float], float]:
    """POST a streaming request; return the NDJSON objects, chunk arrival times, start time."""
    start = time.monotonic()
    events, arrivals = [], []
    with requests.post(url, json=body | {"stream": True}, headers=headers, stream=True,
                       timeout=120) as reply:
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        buffer = b""
        for chunk in reply.iter_content(chunk_size=None):
            arrivals.append(time.monotonic())
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            events += [json.loads(line) for line in lines if line]
    assert not buffer
    return events, arrivals, start


def test_chunks_arrive_incrementally(server, llm_url):
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    events, arrivals, start = stream(llm_url, server.headers(), body)
    assert len(arrivals) >= 5, "the whole answer came in a handful of chunks"
    first, last = arrivals[0] - start, arrivals[-1] - start
    assert first < 0.5 * last, f"first chunk at {first:.3f}s, last at {last:.3f}s"
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 400
    assert sum(len(e["token_ids"]) for e in events) == 400
    assert all("finish_reason" not in e for e in events[:-1])


def peak_running_during(server, stop: threading.Event, seen: list[int]) -> None:
    url = f"{server.url()}/predictions/llm/1.0/stats"
    while not stop.is_set():
        seen.append(requests.get(url, headers=server.headers(), timeout=10).json()["num_running"])
        time.sleep(0.01)


def bad_requests(server, llm_url: str) -> list[tuple[int, str]]:
    headers = server.headers()
    long_prompt = "word " * 3000
    cases = [("not json", {"data": b"{not json", "headers": headers | {
                 "Content-Type": "application/json"}}),
             ("wrong type", {"json": {"prompt": "hi", "max_tokens": "many"}}),
             ("empty prompt", {"json": {"prompt": ""}}),
             ("over-long prompt", {"json": {"prompt": long_prompt}}),
             ("negative", {"json": {"prompt": "hi", "temperature": -1}}),
             ("NaN", {"data": b'{"prompt": "hi", "top_p": NaN}', "headers": headers | {
                 "Content-Type": "application/json"}}),
             ("unknown field", {"json": {"prompt": "hi", "max_token": 3}})]
    results = []
    for _, kwargs in cases:
        kwargs.setdefault("headers", headers)
        reply = requests.post(llm_url, timeout=60, **kwargs)
        results.append((reply.status_code, reply.text))
    return results


def test_concurrent_streams_match_offline_with_static_and_bad_requests(
        server, llm_url, offline_engine):
    params = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
    expected = offline_engine.generate(PROMPTS, SamplingParams(**params))
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=peak_running_during, args=(server, stop, seen))
    watcher.start()
    base = f"{server.url()}/predictions"
    texts = ["what a wonderful and great day", "this was terrible and boring"] * 4
    with ThreadPoolExecutor(max_workers=32) as pool:
        streams = [pool.submit(stream, llm_url, server.headers(), {"prompt": p} | params)
                   for p in PROMPTS]
        bad = pool.submit(bad_requests, server, llm_url)
        labels = [pool.submit(requests.post, f"{base}/classifier", json={"text": t},
                              headers=server.headers(), timeout=120) for t in texts]
        static = [pool.submit(requests.post, f"{base}/llm_static", json={"prompt": p} | params,
                              headers=server.headers(), timeout=300) for p in PROMPTS[:8]]
        results = [f.result() for f in streams]
        bad_results = bad.result()
        label_replies = [f.result() for f in labels]
        static_replies = [f.result() for f in static]
    stop.set()
    watcher.join()
    for (events, _, _), want in zip(results, expected):
        assert [t for e in events for t in e["token_ids"]] == want.token_ids
        assert "".join(e["text"] for e in events) == want.text
        assert events[-1]["finish_reason"] == "length"
    assert max(seen) > 1, f"engine never ran more than one request at once: {seen}"
    for status, text in bad_results:
        assert 400 <= status < 500, (status, text)
        assert json.loads(text)["error"]["message"]
    for reply, text in zip(label_replies, texts):
        assert reply.status_code == 200, reply.text
        want = "positive" if "wonderful" in text else "negative"
        assert reply.json()["label"] == want
    assert max(r.json()["batch_size"] for r in label_replies) > 1
    for reply, want in zip(static_replies, expected[:8]):
        assert reply.status_code == 200, reply.text
        assert reply.json()["token_ids"] == want.token_ids
    assert max(r.json()["batch_size"] for r in static_replies) > 1


def test_non_streaming_reply_is_one_object(server, llm_url, offline_engine):
    params = {"max_tokens": 12, "temperature": 0}
    want = offline_engine.generate([PROMPTS[0]], SamplingParams(**params))[0]
    reply = requests.post(llm_url, json={"prompt": PROMPTS[0]} | params,
                          headers=server.headers(), timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["token_ids"] == want.token_ids and body["text"] == want.text
    assert body["finish_reason"] == want.finish_reason
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
