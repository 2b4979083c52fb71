"""Stopping a TorchServe with streams in flight, on a server of its own (model API on):
draining then unregistering the LLM over the management API, and ``scripts/serve.py``'s stop,
which drains the LLM worker before stopping Java."""
import time

import pytest
import requests

from scripts.serve import _alive, drain_workers, free_ports, start_server, stop_server
from tests.handlers.test_reliability import LONG, Stream


@pytest.fixture(scope="module")
def own_server(archives, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("torchserve-stop")
    srv = start_server(archives, ("llm",), run_dir, ports=free_ports(), timeout_s=240,
                       model_api=True)
    yield srv
    stop_server(run_dir)


def test_drain_then_unregister_ends_streams_with_an_error_chunk(own_server):
    """Unregistering with streams in flight leaves their clients waiting until their own read
    timeout (TorchServe re-queues the jobs of a model it then removes); drained first, each
    stream ends with a last chunk carrying the error, and the unregister finds nothing open."""
    srv = own_server
    streams = [Stream(srv, LONG, timeout_s=60) for _ in range(2)]
    for s in streams:
        assert s.first.wait(30)
    drain_workers(srv, ("llm",))
    for s in map(Stream.join, streams):
        assert s.status == 200 and s.finished_cleanly, s.__dict__
        assert "shutting down" in s.lines[-1]["error"]
    reply = requests.delete(f"{srv.url('management')}/models/llm",
                            headers=srv.headers("management"), timeout=120)
    assert reply.status_code == 200, reply.text
    reply = requests.post(f"{srv.url('management')}/models?url=llm.mar&initial_workers=1"
                          f"&synchronous=true", headers=srv.headers("management"), timeout=240)
    assert reply.status_code == 200, reply.text


def test_stop_drains_streams_then_stops_java(own_server):
    srv = own_server
    streams = [Stream(srv, LONG, timeout_s=60) for _ in range(3)]
    for s in streams:
        assert s.first.wait(30)
    t0 = time.monotonic()
    assert stop_server(srv.run_dir)
    stopped_s = time.monotonic() - t0
    assert not _alive(srv.pid)
    for s in map(Stream.join, streams):
        assert s.status == 200 and s.finished_cleanly, s.__dict__
        assert "shutting down" in s.lines[-1]["error"]
    print(f"stop: streams drained and Java gone in {stopped_s:.1f} s")
