"""Several-workers benchmark: the continuous-batching ``llm`` served by one worker with every
core against N workers splitting the cores (threads per worker = cores / workers, the
handler's default), each run sending ``--streams`` streaming requests at once.

One TorchServe per worker count (free ports, token auth on, only ``llm``, its archive built
with minWorkers = maxWorkers = N); the same seeded workload as bench/serve.py (long-tail
prompt and output lengths, outputs forced with ignore_eos, greedy). Reports output tok/s,
TTFT and end-to-end latency (p50 / p99), failures, and each count's tok/s against one worker;
writes ``results.json``.

    python bench/workers.py --workers 1,2 --streams 16,64 --scale 0.25 --out-dir bench_results/workers
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` and `scripts.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import os
import tempfile

from bench.client import warm_up
from bench.metrics import machine
from bench.models import add_model_arg, resolve
from bench.serve import add_workload_args, run_model
from bench.workload import make_workload
from engine.models import read_config
from kernels import cpu_build
from scripts.build_archives import ROOT, build_archive
from scripts.serve import free_ports, start_server, stop_server, worker_pids


def run_workers(model_path: Path, workers: int, streams: list[int], args: argparse.Namespace
                ) -> list[dict]:
    """Every ``streams`` run on one server with ``workers`` workers."""
    cfg = read_config(model_path)
    max_len = min(cfg.max_position_embeddings, args.max_model_len)
    (ROOT / "logs").mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"bench-workers{workers}-", dir=ROOT / "logs"))
    build_archive("llm", model_path, base / "store",
                  keys={"minWorkers": workers, "maxWorkers": workers})
    server = start_server(base / "store", ("llm",), base / "run", ports=free_ports())
    try:
        assert len(worker_pids(server, "llm")) == workers
        warm_up(f"{server.url()}/predictions", server.headers(), cfg.vocab_size, ("llm",),
                count=4 * workers)
        runs = []
        for n in streams:
            workload = make_workload(n, cfg.vocab_size, max_len, seed=args.seed,
                                     scale=args.scale)
            run = run_model(server, "llm", workload, math.inf, args.stats_interval)
            runs.append(dict(workers=workers, streams=n, summary=run["summary"],
                             errors=run["errors"]))
        return runs
    finally:
        stop_server(base / "run")


def print_table(runs: list[dict]) -> None:
    one = {r["streams"]: r["summary"]["tok_s"] for r in runs if r["workers"] == 1}
    print("| workers | streams at once | output tok/s | vs 1 worker | TTFT p50 / p99 ms "
          "| e2e p50 / p99 ms | failures |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        s = r["summary"]
        ratio = f"{s['tok_s'] / one[r['streams']]:.2f}x" if r["streams"] in one else "-"
        print(f"| {r['workers']} | {r['streams']} | {s['tok_s']:.0f} | {ratio} "
              f"| {s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f} "
              f"| {s['e2e_ms']['p50']:.0f} / {s['e2e_ms']['p99']:.0f} | {s['failures']} |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(p)
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--streams", default="16,64", help="requests sent at once, per run")
    add_workload_args(p)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench_results" / "workers")
    args = p.parse_args(argv)
    os.environ.pop("OMP_NUM_THREADS", None)   # the handler then splits the cores
    cpu_build.load()    # built here, not by a worker under TorchServe's startup timeout
    model_path = resolve(args.model)
    streams = [int(n) for n in args.streams.split(",")]
    runs = [run for w in args.workers.split(",")
            for run in run_workers(model_path, int(w), streams, args)]
    print_table(runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(config={k: str(v) for k, v in vars(args).items()}, model=str(model_path),
                  machine=machine(), runs=runs)
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out_dir / 'results.json'}")
    return runs


if __name__ == "__main__":
    main()
