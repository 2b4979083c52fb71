"""Offline throughput benchmark: this engine against transformers, on one seeded workload.

In one process, on the same checkpoint and the same mixed-length requests (every output forced
to its target length, greedy; fp32 on CPU unless ``--device``/``--dtype`` say otherwise), it
runs one after another: (1) our ``LLMEngine`` with every request added at once; (2) the
ceiling: the exact forward + logits calls our engine made in (1), captured from the benchmark
side and replayed back to back with nothing in between;
(3) transformers' continuous batching with the same KV pool and token budget; (4) transformers'
static padded ``generate`` in fixed batches, as a TorchServe static-batching handler does.
It prints throughput, latency and KV-cache numbers, the ratios, and whether the greedy tokens
agree; ``--json`` writes all of it. It only wraps ``forward``/``logits`` of its own engine's
model, never engine code paths.

    python bench/offline.py --num-requests 64 --scale 0.5 --threads 1 \\
        --json bench_results/offline.json
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` and `scripts.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig

from bench.hf_baselines import load_hf, run_hf_cb, run_hf_static
from bench.metrics import SystemResult, agreement, peak_rss_gib, print_table, write_report
from bench.models import add_model_arg, resolve
from bench.workload import Request, make_workload
from engine import LLMEngine, SamplingParams

SYSTEMS = ("ours", "hf_cb", "hf_static", "ceiling")


@contextmanager
def capture_forward(model: torch.nn.Module) -> Iterator[list[list]]:
    """Record every ``model(ids, positions, meta)`` call and the rows its ``logits`` got."""
    steps: list[list] = []
    forward, logits = model.forward, model.logits

    def recording_forward(input_ids, positions, meta):
        steps.append([input_ids, positions, meta, None])
        return forward(input_ids, positions, meta)

    def recording_logits(hidden):
        steps[-1][3] = hidden
        return logits(hidden)

    model.forward, model.logits = recording_forward, recording_logits
    try:
        yield steps
    finally:
        del model.forward, model.logits      # back to the class methods


def run_ours(llm: LLMEngine, workload: list[Request], num_sanity: int) -> tuple[SystemResult, list]:
    """All requests at once, step until done; also returns the captured forward calls."""
    llm.generate([r.prompt_ids for r in workload[:2]],
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    base_preemptions = llm.stats().num_preemptions
    index = {r.request_id: i for i, r in enumerate(workload)}
    times: list[list[float]] = [[] for _ in workload]
    tokens: list[list[int]] = [[] for _ in workload]
    res = SystemResult("ours", wall_s=0.0, num_requests=len(workload), output_tokens=0,
                       token_times_s=times, peak_batch=0)
    with capture_forward(llm.runner.model) as steps, \
            tqdm(total=len(workload), desc="ours", unit="req") as bar:
        start = time.perf_counter()
        for r in workload:
            llm.add_request(r.request_id, r.prompt_ids, SamplingParams(
                temperature=0, max_tokens=r.output_len, ignore_eos=True))
        while llm.has_unfinished():
            outputs = llm.step()
            now = time.perf_counter() - start
            stats = llm.stats()
            res.peak_batch = max(res.peak_batch, stats.num_running)
            res.kv_usage.append(stats.num_blocks_used / stats.num_blocks)
            res.kv_fill.append(stats.kv_utilization)
            for out in outputs:
                i = index[out.request_id]
                times[i] += [now] * len(out.token_ids)
                tokens[i] += out.token_ids
                bar.update(out.finished)
        res.wall_s = time.perf_counter() - start
    res.preemptions = llm.stats().num_preemptions - base_preemptions
    res.tokens_per_request = [len(t) for t in tokens]
    res.output_tokens = sum(res.tokens_per_request)
    res.first_tokens = tokens[:num_sanity]
    res.peak_rss_gib = peak_rss_gib()
    res.note = f"{len(steps)} steps, {llm.runner.num_blocks} blocks of {llm.config.block_size}"
    return res, steps


@torch.inference_mode()
def run_ceiling(model: torch.nn.Module, steps: list[list], num_requests: int) -> SystemResult:
    """Replay the captured forward + logits calls back to back: the engine's compute alone."""
    for ids, pos, meta, rows in steps[:3]:     # warm-up
        model(ids, pos, meta)
    start = time.perf_counter()
    for ids, pos, meta, rows in tqdm(steps, desc="ceiling", unit="step"):
        model(ids, pos, meta)
        if rows is not None:
            model.logits(rows)
    wall = time.perf_counter() - start
    produced = sum(0 if rows is None else rows.shape[0] for *_, rows in steps)
    return SystemResult("ceiling", wall_s=wall, num_requests=num_requests, output_tokens=produced,
                        peak_rss_gib=peak_rss_gib(),
                        note="our engine's forward + logits calls replayed back to back")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(p)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplies the mean prompt (128) and output (256) lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-blocks", type=int, default=1024, help="KV pool, both engines")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--static-batch-size", type=int, default=8)
    p.add_argument("--sanity-requests", type=int, default=4, help="compared token for token")
    p.add_argument("--device", default="cpu", help="both engines' device (cpu, cuda[:N])")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch intra-op threads for every system "
                   "(default: torch's choice; 1 is steadier on a shared machine)")
    p.add_argument("--json", type=Path, help="write every number here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or caller_threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(caller_threads)


def _run(args: argparse.Namespace) -> dict:
    model_path = resolve(args.model)
    llm = LLMEngine(model_path, num_blocks=args.num_blocks, block_size=args.block_size,
                    max_num_seqs=args.max_num_seqs, dtype=args.dtype, device=args.device,
                    max_num_batched_tokens=args.max_num_batched_tokens)
    workload = make_workload(args.num_requests, AutoConfig.from_pretrained(model_path).vocab_size,
                             llm.max_model_len, seed=args.seed, scale=args.scale)
    targets = [r.output_len for r in workload]
    prompts = [r.prompt_len for r in workload]
    print(f"{torch.get_num_threads()} torch threads; {len(workload)} requests: prompts mean "
          f"{np.mean(prompts):.0f} max {max(prompts)}, outputs mean {np.mean(targets):.0f} "
          f"max {max(targets)} (total {sum(targets)} tokens)")
    results = {}
    results["ours"], steps = run_ours(llm, workload, args.sanity_requests)
    results["ceiling"] = run_ceiling(llm.runner.model, steps, len(workload))
    del steps, llm
    hf = load_hf(model_path, args.dtype, args.device)
    results["hf_cb"] = run_hf_cb(hf, workload, args.block_size, args.num_blocks,
                                 args.max_num_batched_tokens, args.max_num_seqs,
                                 args.sanity_requests)
    results["hf_static"] = run_hf_static(hf, workload, args.static_batch_size,
                                         args.sanity_requests)
    summaries = {name: results[name].summary() for name in SYSTEMS}
    ours = summaries["ours"]["tok_s"]
    ratios = {"ours / hf_cb (>= 2)": ours / summaries["hf_cb"]["tok_s"],
              "ours / hf_static": ours / summaries["hf_static"]["tok_s"],
              "ours / ceiling (>= 0.9)": ours / summaries["ceiling"]["tok_s"]}
    sanity = {other: agreement(results["ours"].first_tokens, results[other].first_tokens)
              for other in ("hf_cb", "hf_static")}
    print_table(summaries, ratios)
    for other, verdicts in sanity.items():
        print(f"greedy tokens, ours vs {other}, first {len(verdicts)} requests: {verdicts}")
    report = dict(config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  model=str(model_path), threads=torch.get_num_threads(), targets=targets,
                  prompt_lens=prompts, systems=summaries, ratios=ratios, sanity=sanity)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
