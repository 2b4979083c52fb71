"""Several continuous-batching workers through a real TorchServe (its own server: the tiny
LLM with minWorkers/maxWorkers 2, token auth on): concurrent streams all complete and both
workers serve them; scaling up and down through the management API under traffic ends
every client (drained first: only last lines and 503s; not drained: TorchServe's race may
also cut a stream or drop it)."""
import json
import threading
from collections import Counter

import pytest
import requests

from scripts.build_archives import ROOT, build_archive, ensure_checkpoints
from scripts.serve import free_ports, scale_workers, start_server, stop_server, worker_pids
from tests.handlers.test_reliability import client_timeout


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    store = tmp_path_factory.mktemp("archives-2w")
    checkpoint = ensure_checkpoints("tiny", ROOT / "models", None)["llm"]
    build_archive("llm", checkpoint, store, keys={"minWorkers": 2, "maxWorkers": 2})
    run_dir = tmp_path_factory.mktemp("torchserve-2w")
    srv = start_server(store, ("llm",), run_dir, ports=free_ports(), timeout_s=300)
    yield srv
    stop_server(run_dir)


def stream(srv, prompt: str, max_tokens: int, timeout_s: float = 60) -> str:
    """One streamed request; how it ended: "length", "error: ...", "503", "cut ..." or
    "timeout" (the client's own read timeout: nothing ended it)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    lines = []
    try:
        with requests.post(f"{srv.url()}/predictions/llm", json=body, headers=srv.headers(),
                           stream=True, timeout=(10, timeout_s)) as reply:
            if reply.status_code != 200:
                return str(reply.status_code)
            lines = [json.loads(line) for line in reply.iter_lines() if line]
    except requests.RequestException as exc:
        return "timeout" if client_timeout(exc) else f"cut {type(exc).__name__}"
    last = lines[-1] if lines else {}
    if last.get("finish_reason") == "length":
        assert last["usage"]["completion_tokens"] == max_tokens, last
        return "length"
    return f"error: {last.get('error')}" if last.get("finish_reason") == "error" else "no end"


def burst(srv, n: int, max_tokens: int) -> Counter:
    ends = [""] * n
    threads = [threading.Thread(target=lambda i=i: ends.__setitem__(
        i, stream(srv, f"story number {i}", max_tokens))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Counter(ends)


class Traffic:
    """``clients`` threads sending streams back to back until ``stop``; counts the endings."""

    def __init__(self, srv, clients: int = 4, max_tokens: int = 100) -> None:
        self.ends: Counter = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(srv, c, max_tokens))
                         for c in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, srv, client: int, max_tokens: int) -> None:
        i = 0
        while not self._stop.is_set():
            self.ends[stream(srv, f"client {client} story {i}", max_tokens, timeout_s=30)] += 1
            i += 1

    def stop(self) -> Counter:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.ends


def served_by(srv) -> dict[int, int]:
    """Prompt tokens so far of each worker that answered the stats route (by PID)."""
    seen: dict[int, int] = {}
    pids = set(worker_pids(srv, "llm"))
    for _ in range(200):
        stats = requests.get(f"{srv.url()}/predictions/llm/1.0/stats", headers=srv.headers(),
                             timeout=10).json()
        seen[stats["pid"]] = stats["prompt_tokens_total"]
        if set(seen) >= pids:
            break
    return seen


def test_two_workers_complete_16_and_64_concurrent_streams(two_workers):
    srv = two_workers
    assert len(worker_pids(srv, "llm")) == 2
    assert burst(srv, 16, 64) == {"length": 16}
    assert burst(srv, 64, 32) == {"length": 64}
    seen = served_by(srv)
    print(f"prompt tokens by worker: {seen}")
    assert len(seen) == 2 and all(tokens > 0 for tokens in seen.values()), seen


def test_scale_under_traffic_ends_every_client(two_workers):
    srv = two_workers
    traffic = Traffic(srv)
    try:
        scale_workers(srv, "llm", 1, drain=True)      # drained: streams get an error line
        assert len(worker_pids(srv, "llm")) == 1
        scale_workers(srv, "llm", 2)                  # up: the new worker must not wedge
        assert len(worker_pids(srv, "llm")) == 2
        after_up = burst(srv, 16, 32)
    finally:
        ends = traffic.stop()
    print(f"drained scale-down and scale-up under traffic: {dict(ends)}; then {after_up}")
    assert after_up == {"length": 16}
    clean = {"length", "503", "error: the server is shutting down this model's worker; "
                              "retry later"}
    assert set(ends) <= clean and ends["length"] > 0, ends

    traffic = Traffic(srv)
    try:
        scale_workers(srv, "llm", 1, drain=False)
        after_down = burst(srv, 16, 32)
    finally:
        ends = traffic.stop()
    print(f"undrained scale-down under traffic: {dict(ends)}; then {after_down}")
    assert after_down == {"length": 16}
    assert "no end" not in ends and ends["length"] > 0, ends
    assert all(end in ("length", "timeout") or end.startswith(("cut", "error", "5"))
               for end in ends), ends
