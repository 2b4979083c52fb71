"""Measures what serving through TorchServe's ``continuousBatching`` worker mode costs.

Runs the same greedy workload (N concurrent streams) twice: offline through
``LLMEngine.generate`` in this process, then through a real TorchServe streaming NDJSON, and
prints output tokens/s of both, their ratio, TTFT and inter-chunk gaps. This is the evidence
for the worker-mode choice in docs/serving.md (the asyncCommunication numbers there come
from /work/shared/torchserve-notes.md).

    python scripts/measure_serving.py --size tiny --streams 16 --max-tokens 128
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import yaml

from scripts.build_archives import ROOT, build_all
from scripts.serve import free_ports, start_server, stop_server


def one_stream(url: str, headers: dict, body: dict) -> tuple[float, list[float], int]:
    start = time.monotonic()
    arrivals, tokens = [], 0
    with requests.post(url, json=body, headers=headers, stream=True, timeout=600) as reply:
        for line in reply.iter_lines(chunk_size=None):
            if line:
                arrivals.append(time.monotonic() - start)
                tokens += len(json.loads(line)["token_ids"])
    return start, arrivals, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads offline")
    args = parser.parse_args(argv)
    prompts = [f"Request {i} about topic {i * 13}" for i in range(args.streams)]
    body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}

    import torch

    from engine import LLMEngine, SamplingParams
    torch.set_num_threads(args.threads)   # TorchServe gives its worker OMP_NUM_THREADS too
    section = yaml.safe_load((ROOT / "config" / "llm.model-config.yaml").read_text())["handler"]
    model = ROOT / "models" / f"{args.size}-llama"
    with tempfile.TemporaryDirectory() as tmp:
        archives = build_all(args.size, out=Path(tmp) / "archives", names=("llm",))
        engine = LLMEngine(model, **{k: v for k, v in section.items()
                                     if k not in ("model_path", "default_max_tokens",
                                                  "max_tokens_limit", "lease_s", "step_wait_s")})
        engine.generate(["warm up"], SamplingParams(max_tokens=4))
        t0 = time.monotonic()
        engine.generate(prompts, SamplingParams(**{k: v for k, v in body.items()
                                                   if k != "stream"}))
        offline_s = time.monotonic() - t0
        del engine
        server = start_server(Path(archives["llm"]).parent, ("llm",), Path(tmp) / "run",
                              free_ports(), token_auth=False)
        try:
            url = f"{server.url()}/predictions/llm"
            one_stream(url, {}, {"prompt": "warm up"} | body)
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.streams) as pool:
                results = list(pool.map(lambda p: one_stream(url, {}, {"prompt": p} | body),
                                        prompts))
            served_s = time.monotonic() - t0
        finally:
            stop_server(Path(tmp) / "run")
    total = args.streams * args.max_tokens
    ttft = [arr[0] for _, arr, _ in results]
    gaps = [b - a for _, arr, _ in results for a, b in zip(arr, arr[1:])]
    chunks = sum(len(arr) for _, arr, _ in results)
    print(f"workload: {args.streams} streams x {args.max_tokens} tokens, {args.size} model")
    print(f"offline engine : {total / offline_s:8.1f} tok/s ({offline_s:.2f} s)")
    print(f"TorchServe     : {total / served_s:8.1f} tok/s ({served_s:.2f} s), "
          f"ratio {offline_s / served_s:.2f}")
    print(f"TTFT mean {statistics.mean(ttft) * 1e3:.1f} ms, p50 {statistics.median(ttft) * 1e3:.1f}"
          f" ms; inter-chunk gap mean {statistics.mean(gaps) * 1e3:.1f} ms; "
          f"{total / chunks:.2f} tokens per chunk")


if __name__ == "__main__":
    main()
