"""The KServe example (deploy/kserve/) started the way KServe's TorchServe runtime starts it:
the InferenceService's own container args and env, with /mnt/models pointing at the storage
tree scripts/build_kserve.py writes, and its config.properties unchanged; only the ports (and
the metrics config's path) move, through the TS_* variables the config enables, to free
loopback ones. A streamed native completion and a streamed OpenAI chat completion come back
complete, served by the workers the config's model_snapshot asks for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from scripts.build_kserve import KSERVE, build_kserve
from scripts.serve import Server, free_ports, stop_server, wait_ready, worker_pids


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    store = build_kserve(tmp_path_factory.mktemp("mnt-models"), size="tiny")
    run = tmp_path_factory.mktemp("kserve-run")
    for sub in ("logs", "tmp", "java-tmp"):
        (run / sub).mkdir()
    model = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())["spec"]["predictor"][
        "model"]
    args = [arg.replace("/mnt/models", str(store)) for arg in model["args"]]
    args[0] = str(Path(sys.executable).with_name(args[0]))
    ports = free_ports()
    own = {e["name"]: e["value"].replace(":8085", f":{ports['inference']}")
           for e in model["env"]}
    env = dict(os.environ, **own,
               TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{ports['inference']}",
               TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports['management']}",
               TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports['metrics']}",
               TS_GRPC_INFERENCE_PORT=str(ports["grpc_inference"]),
               TS_GRPC_MANAGEMENT_PORT=str(ports["grpc_management"]),
               TS_METRICS_CONFIG=str(store / "config" / "metrics.yaml"),
               LOG_LOCATION=str(run / "logs"), METRICS_LOCATION=str(run / "logs"),
               TMPDIR=str(run / "tmp"), TEMP=str(run / "java-tmp"))
    with open(run / "logs" / "torchserve.out", "ab") as out:
        proc = subprocess.Popen(args, cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(run, ports, proc.pid, None, None)
    try:
        wait_ready(srv, ("llm",), token_auth=False, timeout_s=300)
        yield srv
    finally:
        stop_server(run, drain=())
        proc.wait(timeout=60)


def test_kserve_layout_serves_streams_on_its_workers(kserve):
    config = (KSERVE / "config.properties").read_text()
    snapshot = json.loads(config.split("model_snapshot=", 1)[1].splitlines()[0])
    assert len(worker_pids(kserve, "llm")) == snapshot["models"]["llm"]["1.0"]["minWorkers"]
    base = f"{kserve.url()}/predictions/llm"
    with requests.post(base, json={"prompt": "Once upon a time", "max_tokens": 12,
                                   "ignore_eos": True, "stream": True},
                       stream=True, timeout=60) as reply:
        assert reply.status_code == 200
        lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert len(lines) >= 2 and lines[-1]["finish_reason"] == "length"
    assert lines[-1]["usage"]["completion_tokens"] == 12
    chat = {"model": "llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "stream": True}
    with requests.post(f"{base}/1.0/v1/chat/completions", json=chat, stream=True,
                       timeout=60) as reply:
        assert reply.status_code == 200
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]
              if json.loads(e[6:])["choices"]]
    assert finish[-1] in ("length", "stop")
