"""Disconnects free KV blocks, keep-alive connections survive complete responses, token
authorization is on by default, and the LLM metrics reach Prometheus."""
import json
import socket
import time

import requests

LONG = {"prompt": "Tell me a long story", "max_tokens": 900, "temperature": 0,
        "ignore_eos": True, "stream": True}


def stats(server) -> dict:
    return requests.get(f"{server.url()}/predictions/llm/1.0/stats", headers=server.headers(),
                        timeout=10).json()


def wait_idle(server, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        now = stats(server)
        if now["num_blocks_used"] == 0 and now["num_running"] == 0 or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def read_then_drop(server, llm_url: str, min_bytes: int = 300) -> None:
    """Start a long stream on a raw socket, read a little of it, then hang up."""
    body = json.dumps(LONG).encode()
    port = server.ports["inference"]
    head = (f"POST /predictions/llm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {server.inference_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        got = b""
        while len(got) < min_bytes:
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        assert stats(server)["num_blocks_used"] > 0
        sock.shutdown(socket.SHUT_RDWR)


def test_disconnect_of_only_stream_frees_blocks(server, llm_url):
    assert wait_idle(server, 30)["num_blocks_used"] == 0
    before = stats(server)["generation_tokens_total"]
    read_then_drop(server, llm_url)
    after = wait_idle(server, 10)     # the lease (3 s) runs out: no call comes any more
    assert after["num_blocks_used"] == 0 and after["num_running"] == 0
    assert after["generation_tokens_total"] - before < LONG["max_tokens"]


def test_disconnect_beside_other_stream_frees_blocks(server, llm_url):
    keep = requests.post(llm_url, json=LONG | {"max_tokens": 600}, headers=server.headers(),
                         stream=True, timeout=120)
    read_then_drop(server, llm_url)
    deadline = time.monotonic() + 5
    while stats(server)["num_running"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats(server)["num_running"] <= 1, "the dropped stream is still generating"
    body = b"".join(keep.iter_content(chunk_size=None)).decode()
    assert '"finish_reason": "length"' in body.splitlines()[-1]
    assert wait_idle(server, 10)["num_blocks_used"] == 0


def test_keep_alive_connection_after_complete_responses(server, llm_url):
    with requests.Session() as session:
        session.headers.update(server.headers())
        for _ in range(3):
            assert session.post(llm_url, json={"prompt": ""}, timeout=30).status_code == 400
            assert session.get(f"{server.url()}/predictions/llm/1.0/v1/models",
                               timeout=30).status_code == 200
            reply = session.post(llm_url, json={"prompt": "hi", "max_tokens": 5,
                                                "stream": True}, timeout=30)
            assert reply.status_code == 200
            assert '"finish_reason"' in reply.text.splitlines()[-1]


def test_token_authorization_is_on_by_default(server, llm_url):
    body = {"prompt": "hi", "max_tokens": 2}
    refused = requests.post(llm_url, json=body, timeout=30)
    assert 400 <= refused.status_code < 500
    assert "Token Authorization failed" in refused.text
    wrong = requests.post(llm_url, json=body, headers={"Authorization": "Bearer nope"},
                          timeout=30)
    assert 400 <= wrong.status_code < 500
    ok = requests.post(llm_url, json=body, headers=server.headers(), timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    registered = requests.post(f"{server.url('management')}/models?url=llm.mar",
                               headers=server.headers("management"), timeout=30)
    assert registered.status_code >= 400, "the model-management API should be off"


def test_llm_metrics_reach_prometheus(server, llm_url):
    for _ in range(2):      # the second identical prompt is a prefix-cache hit
        requests.post(llm_url, json={"prompt": "metrics for the prefix cache " * 8,
                                     "max_tokens": 4}, headers=server.headers(), timeout=30)
    wanted = ["llm_time_to_first_token_seconds_count", "llm_inter_token_latency_seconds_count",
              "llm_queue_time_seconds_count", "llm_e2e_latency_seconds_count",
              "llm_requests_running", "llm_requests_waiting", "llm_kv_blocks_used",
              "llm_kv_utilization", "llm_prompt_tokens_total", "llm_generation_tokens_total",
              "llm_peak_running", "llm_prefix_cache_hit_tokens_total"]
    deadline = time.monotonic() + 15
    while True:
        text = requests.get(f"{server.url('metrics')}/metrics", timeout=10).text
        missing = [m for m in wanted if f'{m}{{ModelName="llm"' not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing
    assert "# TYPE llm_preemptions_total counter" in text
