"""Reliability through a real TorchServe: hostile input, deadlines, a SIGTERM drain, scaling
to zero mid-stream, and a SIGKILLed LLM worker, with the static models serving throughout.

The tests that stop the LLM worker leave a fresh one READY behind them. They run on a server
of their own: scaling the LLM to zero undrained can leave TorchServe 0.12 with no worker for
it (a WorkerThread race, docs/serving.md "Reliability"; seen once as "job is null" under
load), which must not turn every later test of the package into a 503."""
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from urllib3.exceptions import ReadTimeoutError

from scripts.serve import drain_workers, serving, worker_pids

LONG = {"prompt": "Tell me a long story", "max_tokens": 1000, "temperature": 0,
        "ignore_eos": True}


@pytest.fixture(scope="module")
def server(archives, tmp_path_factory: pytest.TempPathFactory):
    with serving(archives, tmp_path_factory.mktemp("torchserve-reliability"),
                 token_auth=True, timeout_s=240) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm_url(server) -> str:
    return f"{server.url()}/predictions/llm"


def stats(server) -> dict:
    return requests.get(f"{server.url()}/predictions/llm/1.0/stats", headers=server.headers(),
                        timeout=10).json()


def wait_idle(server, timeout_s: float = 15) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        now = stats(server)
        if now["num_blocks_used"] == 0 and now["num_streams"] == 0 or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def scale(server, workers: int) -> None:
    reply = requests.put(f"{server.url('management')}/models/llm?min_worker={workers}"
                         f"&max_worker={workers}&synchronous=true",
                         headers=server.headers("management"), timeout=120)
    assert reply.status_code == 200, reply.text


def wait_worker(server, old_pids: list[int], timeout_s: float = 120) -> int:
    """Until the LLM has one READY worker that is not one of ``old_pids``; returns its PID."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = requests.get(f"{server.url('management')}/models/llm",
                             headers=server.headers("management"), timeout=10)
        workers = reply.json()[0]["workers"] if reply.ok else []
        if workers and all(w["status"] == "READY" and w["pid"] not in old_pids
                           for w in workers):
            return workers[0]["pid"]
        time.sleep(0.2)
    raise TimeoutError("no fresh LLM worker")


def client_timeout(exc: requests.RequestException) -> bool:
    """The client gave up waiting: requests reports a read timeout mid-body as a
    ConnectionError wrapping urllib3's ReadTimeoutError (a reset or a connection closed
    mid-chunk is a ChunkedEncodingError)."""
    return isinstance(exc, requests.Timeout) or any(
        isinstance(arg, ReadTimeoutError) for arg in exc.args)


class Stream:
    """A streaming request on its own thread; records its lines and how it ended:
    ``error`` names the transport error, ``timed_out`` says the client's own read timeout
    (``timeout_s``) ended it, not the server."""

    def __init__(self, server, body: dict, timeout_s: float = 60) -> None:
        self.lines: list[dict] = []
        self.status: int | None = None
        self.error: str | None = None
        self.timed_out = False
        self.ended_s: float | None = None
        self.first = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, body, timeout_s))
        self._thread.start()

    def _run(self, server, body: dict, timeout_s: float) -> None:
        try:
            with requests.post(f"{server.url()}/predictions/llm", json=body | {"stream": True},
                               headers=server.headers(), stream=True,
                               timeout=(10, timeout_s)) as reply:
                self.status = reply.status_code
                for line in reply.iter_lines():
                    if line:
                        self.lines.append(json.loads(line))
                        self.first.set()
        except requests.RequestException as exc:
            self.error, self.timed_out = type(exc).__name__, client_timeout(exc)
        finally:
            self.ended_s = time.monotonic()
            self.first.set()

    def join(self) -> "Stream":
        self._thread.join()
        return self

    @property
    def finished_cleanly(self) -> bool:
        return self.error is None and bool(self.lines) and "finish_reason" in self.lines[-1]

    @property
    def ending(self) -> str:
        if self.finished_cleanly:
            return f"last line {self.lines[-1]}"
        return "its own read timeout" if self.timed_out else f"a cut connection ({self.error})"


def test_hostile_bodies_are_400_naming_the_field(server, llm_url):
    headers = server.headers() | {"Content-Type": "application/json"}
    cases = [(b'{"prompt": "caf\xe9 au lait"}', None, "UTF-8"),
             (json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(1000)]}), "stop",
              "at most 16"),
             (json.dumps({"prompt": "hi", "stop": ["x" * 300]}), "stop", "256"),
             (json.dumps({"prompt": "hi", "request_timeout_s": 1e9}), "request_timeout_s",
              "<= 300")]
    for body, param, words in cases:
        reply = requests.post(llm_url, data=body, headers=headers, timeout=30)
        assert reply.status_code == 400, reply.text
        err = reply.json()["error"]
        assert err["param"] == param and words in err["message"], err


def test_deadline_ends_stream_and_whole_reply_and_frees_blocks(server, llm_url):
    wait_idle(server)
    started = time.monotonic()      # a deadline well inside what the whole request takes
    full = requests.post(llm_url, json=LONG, headers=server.headers(), timeout=120)
    assert full.status_code == 200, full.text
    deadline = min(0.3, max(0.01, (time.monotonic() - started) / 4))
    body = LONG | {"request_timeout_s": round(deadline, 3)}
    stream = Stream(server, body).join()
    assert stream.status == 200 and stream.finished_cleanly, stream.__dict__
    last = stream.lines[-1]
    assert last["finish_reason"] == "error" and "request_timeout_s" in last["error"]
    assert last["usage"]["completion_tokens"] < LONG["max_tokens"]
    whole = requests.post(llm_url, json=body, headers=server.headers(), timeout=60)
    assert whole.status_code == 504, whole.text
    assert "request_timeout_s" in whole.json()["error"]["message"]
    assert wait_idle(server)["num_blocks_used"] == 0


def static_calls(server, stop: threading.Event, codes: list[int]) -> None:
    """The static models, called back to back until ``stop``."""
    base = f"{server.url()}/predictions"
    while not stop.is_set():
        for model, body in (("classifier", {"text": "what a wonderful day"}),
                            ("llm_static", {"prompt": "hi", "max_tokens": 2})):
            codes.append(requests.post(f"{base}/{model}", json=body, headers=server.headers(),
                                       timeout=60).status_code)
        stop.wait(0.2)      # steady, light traffic: the restarting worker needs the CPU


def test_sigterm_drain_ends_streams_with_an_error_chunk(server, llm_url):
    old = worker_pids(server, "llm")
    streams = [Stream(server, LONG) for _ in range(3)]
    for s in streams:
        assert s.first.wait(30)
    drain_workers(server, ("llm",), timeout_s=30)
    for s in map(Stream.join, streams):
        assert s.status == 200 and s.finished_cleanly, s.__dict__
        assert s.lines[-1]["finish_reason"] == "error" and "shutting down" in s.lines[-1]["error"]
    refused = requests.post(llm_url, json=LONG, headers=server.headers(), timeout=30)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    now = stats(server)
    assert now["draining"] and now["num_blocks_used"] == 0 and now["num_running"] == 0
    assert all(os.path.exists(f"/proc/{pid}") for pid in old), "the drained worker exited"
    scale(server, 0)
    scale(server, 1)
    wait_worker(server, old)
    ok = requests.post(llm_url, json={"prompt": "hi", "max_tokens": 3}, headers=server.headers(),
                       timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_scale_to_zero_mid_stream_then_up_ends_streams_with_an_error_chunk(server, llm_url):
    """No drain first: TorchServe closes the worker socket and SIGKILLs the worker. A stream
    then ends one of three ways, by a race inside WorkerThread (docs/serving.md,
    "Reliability"): re-queued, it gets the next worker's error chunk; in the batch in flight,
    its connection is cut ("Worker died.", any transport error); dropped by the worker thread
    between two calls, its client waits for its own read timeout. Every client ends, the
    server never ends a body without a last line, and the next worker serves."""
    old = worker_pids(server, "llm")
    streams = [Stream(server, LONG, timeout_s=180) for _ in range(2)]
    for s in streams:
        assert s.first.wait(60)
    scale(server, 0)
    time.sleep(1)
    print(f"scaled to zero: {sum(s.ended_s is None for s in streams)} of 2 clients still waiting")
    scale(server, 1)
    wait_worker(server, old)
    for s in map(Stream.join, streams):
        assert s.status == 200
        assert s.error is not None or s.finished_cleanly, s.__dict__
        if s.finished_cleanly:
            assert s.lines[-1]["finish_reason"] == "error"
            assert "stopped mid-stream" in s.lines[-1]["error"]
        print(f"scale to zero and back: client ended with {s.ending}")
    ok = requests.post(llm_url, json={"prompt": "hi", "max_tokens": 3}, headers=server.headers(),
                       timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_sigkill_mid_stream_worker_comes_back_static_models_serve(server, llm_url):
    old = worker_pids(server, "llm")
    stop, codes = threading.Event(), []
    with ThreadPoolExecutor(2) as pool:
        static = [pool.submit(static_calls, server, stop, codes) for _ in range(2)]
        try:        # a failed assertion must end the static callers, not hang the run
            streams = [Stream(server, LONG, timeout_s=60) for _ in range(4)]
            for s in streams:
                assert s.first.wait(60)
            killed_s = time.monotonic()
            os.kill(old[0], signal.SIGKILL)
            for s in map(Stream.join, streams):     # cut, or dropped (scale-to-zero's race)
                assert s.error is not None or s.finished_cleanly, s.__dict__
                assert not s.finished_cleanly or s.lines[-1]["finish_reason"] == "error", s.__dict__
                print(f"SIGKILL: client ended {s.ended_s - killed_s:.2f} s later with "
                      f"{s.ending}")
            new = wait_worker(server, old)
            back_s = time.monotonic() - killed_s
            ok = requests.post(llm_url, json={"prompt": "hi", "max_tokens": 3},
                               headers=server.headers(), timeout=60)
        finally:
            stop.set()
        for f in static:
            f.result()
    assert new != old[0]
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    print(f"SIGKILL: worker {new} READY {back_s:.1f} s after the kill; static calls {len(codes)}")
    assert codes and set(codes) == {200}, codes
