"""Tensor parallelism through a real TorchServe (its own server: the tiny LLM with
``parallelType: tp`` and a ``torchrun:`` block of nproc-per-node 2, token auth on): a streamed
completion equals the TP=1 engine's greedy answer; a follower rank killed mid-stream ends the
stream with an error chunk (or a cut connection), no client hangs, and the worker comes back
and serves again."""
import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from engine import LLMEngine, SamplingParams
from scripts.build_archives import ROOT, build_archive, ensure_checkpoints
from scripts.serve import free_ports, start_server, stop_server, worker_pids
from tests.handlers.test_reliability import client_timeout

PARAMS = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoint():
    return ensure_checkpoints("tiny", ROOT / "models", None)["llm"]


@pytest.fixture(scope="module")
def tp_server(checkpoint, tmp_path_factory):
    store = tmp_path_factory.mktemp("archives-tp")
    build_archive("llm", checkpoint, store,
                  keys={"parallelType": "tp", "torchrun": "{nproc-per-node: 2}"})
    run_dir = tmp_path_factory.mktemp("torchserve-tp")
    srv = start_server(store, ("llm",), run_dir, ports=free_ports(), timeout_s=300)
    yield srv
    stop_server(run_dir)


def stream(srv, prompt: str, max_tokens: int, timeout_s: float = 60) -> tuple[list, str]:
    """The NDJSON lines of one streamed request and how it ended: "length", "error",
    "cut <transport error>", "timeout" (nothing ended it) or the HTTP status."""
    lines = []
    body = {"prompt": prompt, "stream": True} | PARAMS | {"max_tokens": max_tokens}
    try:
        with requests.post(f"{srv.url()}/predictions/llm", json=body, headers=srv.headers(),
                           stream=True, timeout=(10, timeout_s)) as reply:
            if reply.status_code != 200:
                return lines, str(reply.status_code)
            for line in reply.iter_lines():
                if line:
                    lines.append(json.loads(line))
    except requests.RequestException as exc:
        return lines, "timeout" if client_timeout(exc) else f"cut {type(exc).__name__}"
    return lines, (lines[-1].get("finish_reason") or "no end") if lines else "empty"


def ranks(srv) -> dict[int, psutil.Process]:
    """The worker's torchrun ranks by LOCAL_RANK: TorchServe reports rank 0's PID, whose
    parent (torchrun's agent) started them all."""
    found = {}
    for pid in worker_pids(srv, "llm"):
        for child in psutil.Process(pid).parent().children():
            try:
                rank = child.environ().get("LOCAL_RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = child
    return found


def test_streamed_completion_equals_tp1(tp_server, checkpoint) -> None:
    prompt = "once upon a time there was"
    want = LLMEngine(checkpoint, num_blocks=32).generate([prompt], SamplingParams(**PARAMS),
                                                          use_tqdm=False)[0]
    lines, end = stream(tp_server, prompt, PARAMS["max_tokens"])
    assert end == "length", lines[-1:]
    assert len(lines) > 1       # streamed, delta by delta
    assert [t for line in lines for t in line["token_ids"]] == want.token_ids
    assert "".join(line["text"] for line in lines) == want.text
    assert set(ranks(tp_server)) == {0, 1}


def test_killed_follower_ends_the_stream_and_the_worker_comes_back(tp_server) -> None:
    result = {}
    client = threading.Thread(target=lambda: result.update(
        zip(("lines", "end"), stream(tp_server, "a long story", 600, timeout_s=90))))
    client.start()
    follower = None
    for _ in range(200):        # until the stream has begun
        follower = ranks(tp_server).get(1)
        if follower is not None and _streaming(tp_server):
            break
        time.sleep(0.05)
    assert follower is not None
    os.kill(follower.pid, signal.SIGKILL)
    client.join(timeout=120)
    assert not client.is_alive(), "the client hung after a rank died"
    end = result["end"]
    assert end == "error" or end.startswith("cut"), result
    if end == "error":
        assert result["lines"][-1]["error"]
    deadline = time.monotonic() + 240     # torchrun / TorchServe start the ranks again
    ends = []
    while time.monotonic() < deadline:
        ends.append(stream(tp_server, "back again", 8, timeout_s=60)[1])
        if ends[-1] == "length":
            break
        time.sleep(2)
    assert ends[-1] == "length", ends


def _streaming(srv) -> bool:
    try:
        stats = requests.get(f"{srv.url()}/predictions/llm/1.0/stats", headers=srv.headers(),
                             timeout=10).json()
    except (requests.RequestException, ValueError):
        return False
    return stats.get("generation_tokens_total", 0) > 0 and stats.get("num_running", 0) > 0
