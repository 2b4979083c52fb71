"""Serving benchmark: continuous batching (``llm``) against static batching (``llm_static``).

In one TorchServe run (started here on free ports with its own run dir and token auth, or an
already running one with ``--url``), it sends the same seeded workload (long-tail prompt and
output lengths, outputs forced to their length with ignore_eos, greedy) to ``llm`` over NDJSON
streaming and then to ``llm_static``, at each request rate of ``--rates`` (Poisson arrivals;
``inf`` = all at once, the headline run). Per system it reports req/s, output tok/s, TTFT, TPOT,
ITL, end-to-end latency, failures, peak concurrent requests and KV-cache utilization (ours:
the engine's tokens stored / blocks held, sampled from the stats route; static: per batch,
tokens / (batch size * (longest prompt + longest output)), the padded batch's reservation).
It also runs the in-process engine on the headline workload (served / in-process throughput),
prints the seed document's table beside ours, and writes ``results.json`` and PNG plots.

    python bench/serve.py --num-requests 128 --scale 0.25 --rates 0.5,1,2,4,8,inf \\
        --sweep-requests 16 --threads 1 --out-dir bench_results/serve
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` and `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import math
import os
import signal
import tempfile

import numpy as np
import yaml
from transformers import AutoConfig

from bench.client import RequestRecord, StatsSampler, cpu_seconds, drive, warm_up
from bench.metrics import SystemResult, machine, print_table
from bench.models import add_model_arg, resolve
from bench.serve_report import check_targets, compare, headline_rows, plot_all, print_seed_table
from bench.workload import Request, make_workload
from scripts.serve import Server, free_ports, read_keys, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llm", "llm_static")
STATIC_BATCH_SIZE = 8     # config/llm_static.model-config.yaml batchSize


def static_batches(records: list[RequestRecord], workload: list[Request]
                   ) -> tuple[list[list[int]], str]:
    """The static model's batches as request indices, and how they were found.

    One worker runs one batch at a time and answers a batch's requests together, so in order
    of completion each run of ``batch_size`` replies (as the handler reports it) is a batch.
    If the reports disagree, fall back to arrival order in groups of ``STATIC_BATCH_SIZE``.
    """
    order = sorted((i for i, r in enumerate(records) if r.batch_size),
                   key=lambda i: records[i].done_s)
    batches, pos = [], 0
    while pos < len(order):
        size = records[order[pos]].batch_size
        group = order[pos:pos + size]
        if len(group) != size or any(records[i].batch_size != size for i in group):
            break
        batches.append(group)
        pos += size
    else:
        if len(order) == len(records):
            return batches, "observed: replies' batch_size, grouped in order of completion"
    ranked = sorted(range(len(workload)), key=lambda i: (workload[i].arrival_s, i))
    groups = [ranked[k:k + STATIC_BATCH_SIZE] for k in range(0, len(ranked), STATIC_BATCH_SIZE)]
    return groups, f"assumed: arrival order in groups of {STATIC_BATCH_SIZE}"


def static_kv_fill(batches: list[list[int]], workload: list[Request]) -> list[float]:
    """Per batch: tokens it holds at the end / what its padded cache reserves."""
    fills = []
    for batch in batches:
        reqs = [workload[i] for i in batch]
        reserved = len(reqs) * (max(r.prompt_len for r in reqs) + max(r.output_len for r in reqs))
        fills.append(sum(r.prompt_len + r.output_len for r in reqs) / reserved)
    return fills


def to_result(model: str, wall_s: float, records: list[RequestRecord],
              workload: list[Request]) -> tuple[SystemResult, int]:
    """A SystemResult from the client's records; also the number of failed requests."""
    failures = sum(r.error is not None or r.num_tokens != w.output_len
                   for r, w in zip(records, workload))
    counts = [r.num_tokens for r in records]
    times = [r.token_times_s for r in records]
    if model == "llm_static":   # one whole answer: no per-token timing to speak of
        times = [t[:1] for t in times]
    return SystemResult(model, wall_s, len(records), sum(counts), counts, times), failures


def run_model(server: Server, model: str, workload: list[Request], rate: float,
              stats_interval_s: float) -> dict:
    url = f"{server.url()}/predictions/{model}"
    headers = server.headers()
    desc = f"{model} @ {rate} req/s"
    cpu_before = cpu_seconds(server.pid) if server.pid else {}
    if model == "llm":
        sampler = StatsSampler(f"{url}/1.0/stats", headers, stats_interval_s)
        before = sampler.snapshot()
        with sampler:
            wall_s, records = drive(url, headers, workload, stream=True, desc=desc)
        after = sampler.snapshot()
        res, failures = to_result(model, wall_s, records, workload)
        busy = [s for s in sampler.samples + [after] if s["num_blocks_used"] > 0]
        res.kv_fill = [s["kv_utilization"] for s in busy]
        res.kv_usage = [s["num_blocks_used"] / s["num_blocks"] for s in busy]
        sampled = max((s["num_running"] for s in sampler.samples), default=0)
        grew = after["peak_running"] > before["peak_running"]
        res.peak_batch = max(sampled, after["peak_running"] if grew else 0)
        res.preemptions = after["num_preemptions"] - before["num_preemptions"]
        res.note, batching = f"{len(sampler.samples)} stats samples", None
    else:
        wall_s, records = drive(url, headers, workload, stream=False, desc=desc)
        res, failures = to_result(model, wall_s, records, workload)
        batches, how = static_batches(records, workload)
        res.kv_fill = static_kv_fill(batches, workload)
        res.peak_batch = max((r.batch_size or 0 for r in records), default=0)
        res.note, batching = f"{len(batches)} batches, {how}", dict(method=how, batches=batches)
    cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(server.pid).items()} if cpu_before else {}
    summary = res.summary() | {"failures": failures, "cpu_s": cpu}
    errors = [r.error for r in records if r.error][:5]
    print(f"{desc}: {summary['req_s']:.3g} req/s, {summary['tok_s']:.4g} tok/s, "
          f"{failures} failures {errors or ''}; CPU s in {wall_s:.1f} s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    lat = {k: [t[i] * 1e3 for t in res.token_times_s if t] for k, i in (("ttft", 0), ("e2e", -1))}
    return dict(model=model, rate=rate, summary=summary, latencies_ms=lat, static=batching,
                errors=errors, records=[dict(id=r.request_id, sent_s=r.sent_s, done_s=r.done_s,
                                             tokens=r.num_tokens, batch_size=r.batch_size)
                                        for r in records])


def run_in_process(model_path: Path, workload: list[Request], threads: int | None) -> dict:
    """The engine the server runs (config/llm.model-config.yaml's handler section), in-process."""
    import torch

    from engine import LLMEngine
    from handlers.settings import ENGINE_KEYS
    from bench.offline import run_ours
    section = yaml.safe_load((ROOT / "config" / "llm.model-config.yaml").read_text())["handler"]
    caller = torch.get_num_threads()
    torch.set_num_threads(threads or caller)
    try:
        llm = LLMEngine(model_path, **{k: v for k, v in section.items() if k in ENGINE_KEYS})
        res, _ = run_ours(llm, workload, num_sanity=0)
    finally:
        torch.set_num_threads(caller)
    return res.summary()


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload and sampling options bench/serve.py and bench/workers.py share."""
    p.add_argument("--scale", type=float, default=0.25,
                   help="multiplies the mean prompt (128) and output (256) lengths")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-interval", type=float, default=0.2, help="seconds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(p)
    p.add_argument("--url", help="use this running server (e.g. http://127.0.0.1:8080)")
    p.add_argument("--run-dir", type=Path, help="with --url: where its key_file.json is "
                   "(default logs/server); else the new server's run dir (default: logs/bench-*)")
    p.add_argument("--model-store", type=Path, help="archives dir (default: archives/)")
    p.add_argument("--num-requests", type=int, default=128, help="headline (inf) run")
    p.add_argument("--sweep-requests", type=int, default=16, help="each finite-rate run")
    p.add_argument("--rates", default="0.5,1,2,4,8,inf", help="req/s; inf = all at once")
    add_workload_args(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each TorchServe "
                   "worker (OMP_NUM_THREADS; 0: torch's default) and of the in-process engine")
    p.add_argument("--no-in-process", action="store_true")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench_results" / "serve")
    return p.parse_args(argv)


def start_own(model_path: Path, threads: int | None, model_store: Path | None = None,
              run_dir: Path | None = None, names: tuple[str, ...] = MODELS) -> Server:
    """TorchServe with ``names`` on free ports, token auth on, workers at ``threads``."""
    from scripts.build_archives import build_all
    store = model_store or ROOT / "archives"
    build_all(out=store, llm_path=model_path, names=names)
    (ROOT / "logs").mkdir(exist_ok=True)
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / "logs"))
    caller = os.environ.get("OMP_NUM_THREADS")
    if threads:    # the workers inherit the frontend's environment
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        return start_server(store, names, run_dir, ports=free_ports(), token_auth=True)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if caller is not None:
            os.environ["OMP_NUM_THREADS"] = caller


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    model_path = resolve(args.model)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # still stop our server
    if args.url:
        run_dir = args.run_dir or ROOT / "logs" / "server"
        server = Server(run_dir, {"inference": int(args.url.rsplit(":", 1)[1])}, 0,
                        read_keys(run_dir)[0], None)
    else:
        server = start_own(model_path, args.threads, args.model_store, args.run_dir)
    try:
        return _run(args, server, rates, model_path)
    finally:
        if not args.url:
            stop_server(server.run_dir)


def _run(args: argparse.Namespace, server: Server, rates: list[float], model_path: Path) -> dict:
    cfg = AutoConfig.from_pretrained(model_path)
    max_len = min(cfg.max_position_embeddings, args.max_model_len)
    warm_up(f"{server.url()}/predictions", server.headers(), cfg.vocab_size)
    runs, workloads = [], {}
    for rate in rates:
        n = args.num_requests if math.isinf(rate) else args.sweep_requests
        workloads[rate] = make_workload(n, cfg.vocab_size, max_len, seed=args.seed,
                                        scale=args.scale, request_rate=rate)
        for model in MODELS:
            runs.append(run_model(server, model, workloads[rate], rate, args.stats_interval))
    head_rate = max(rates)
    head = {r["model"]: dict(summary=r["summary"], latencies_ms=r["latencies_ms"])
            for r in runs if r["rate"] == head_rate}
    summaries = {m: head[m]["summary"] for m in MODELS}
    in_process = None
    if not args.no_in_process:
        in_process = run_in_process(model_path, workloads[head_rate], args.threads)
        summaries["in-process"] = in_process
    ratios = compare(summaries)
    print_table(summaries, ratios)
    print("failures: " + ", ".join(f"{m} {summaries[m]['failures']}" for m in MODELS))
    rows = headline_rows(summaries["llm"], summaries["llm_static"])
    print_seed_table(rows)
    targets = check_targets(rows, ratios)
    lens = dict(prompt_lens=[r.prompt_len for r in workloads[head_rate]],
                output_lens=[r.output_len for r in workloads[head_rate]])
    lens |= {k.replace("lens", "mean"): float(np.mean(v)) for k, v in lens.items()}
    report = dict(config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  model=str(model_path), machine=machine(), headline_rate=head_rate,
                  workload=lens, headline=head, runs=runs, in_process=in_process, ratios=ratios,
                  seed_table={k: dict(zip(("llm", "llm_static"), v)) for k, v in rows.items()},
                  targets=targets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    report["plots"] = [str(p) for p in plot_all(report, args.out_dir)]
    print(f"wrote {args.out_dir / 'results.json'} and {', '.join(report['plots'])}")
    return report


if __name__ == "__main__":
    main()
