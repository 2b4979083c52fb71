"""Tensor-parallel benchmark: the engine with ``tensor_parallel_size`` N against one rank,
in-process on CPU (gloo), on the same model and workload.

For each side (TP=1 first, then each N of ``--tp``) one engine runs bench/engine_decode.py's
fixed-batch workload: B prompts of ``--prompt-len`` tokens prefilled in one step, then
decoded to ``--gen-len`` tokens (greedy, ignore_eos), for each B of ``--batches``. TP=1 gets
every thread of ``--threads`` (default: all cores); each of N ranks gets threads / N, as the
engine splits them. Reports prefill and decode tok/s, the bytes of packed weights per rank
(each rank's shard: linears, embedding and head) and each rank's RSS, then the ratios TP=N /
TP=1. Both sides run one after the other in one process: on a shared machine compare them
only within one run.

    python bench/tensor_parallel.py --model smollm2 --tp 2 --batches 1,8,32
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` and `scripts.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os

import psutil
import torch

from bench.engine_decode import make_engine, run_batch
from bench.metrics import machine, write_report
from bench.models import add_model_arg, resolve
from engine import LLMEngine, SamplingParams
from kernels import cpu_build


def weight_bytes(llm: LLMEngine) -> int:
    """Bytes of this rank's packed weights (a tied table counted once); dense where the
    compiled kernels do not apply."""
    model, seen = llm.runner.model, {}
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is not None:
            seen[id(packed)] = packed.nbytes
        for p in module.parameters(recurse=False):
            if p is not None and p.device.type != "meta":
                seen[id(p)] = p.numel() * p.element_size()
    table = model.model.embed_table
    if table is not None:
        seen[id(table)] = table.nbytes
    return sum(seen.values())


def rss_per_rank(llm: LLMEngine) -> list[int]:
    """Resident bytes of rank 0 (this process) and of each follower process."""
    pids = [os.getpid()] + ([p.pid for p in llm.ranks.processes] if llm.ranks else [])
    return [psutil.Process(pid).memory_info().rss for pid in pids]


def run_side(model_path: Path, tp: int, args: argparse.Namespace) -> dict:
    batches = [int(b) for b in args.batches.split(",")]
    llm = make_engine(model_path, batches, args.prompt_len, args.gen_len,
                      max(1, args.threads // tp), "auto", tensor_parallel_size=tp)
    try:
        llm.generate([[5] * 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
        rows = []
        for b in batches:
            rows.append(run_batch(llm, b, args.prompt_len, args.gen_len, args.seed))
            print(f"TP={tp} batch {b}: prefill {rows[-1]['prefill_tok_s']:.0f} tok/s, decode "
                  f"{rows[-1]['decode_tok_s']:.1f} tok/s (TPOT {rows[-1]['tpot_ms']:.1f} ms)",
                  flush=True)
        return dict(tp=tp, threads_per_rank=max(1, args.threads // tp), rows=rows,
                    weight_bytes_per_rank=weight_bytes(llm), rss_per_rank=rss_per_rank(llm))
    finally:
        llm.close()


def print_table(sides: list[dict]) -> None:
    base = sides[0]
    print("| TP | batch | prefill tok/s | vs TP=1 | decode tok/s | vs TP=1 | TPOT ms |")
    print("|---|---|---|---|---|---|---|")
    for side in sides:
        for row, ref in zip(side["rows"], base["rows"]):
            print(f"| {side['tp']} | {row['batch']} | {row['prefill_tok_s']:.0f} "
                  f"| {row['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x "
                  f"| {row['decode_tok_s']:.1f} | {row['decode_tok_s'] / ref['decode_tok_s']:.2f}x "
                  f"| {row['tpot_ms']:.1f} |")
    print("| TP | threads per rank | weight MB per rank | vs TP=1 | RSS MB per rank |")
    print("|---|---|---|---|---|")
    for side in sides:
        w = side["weight_bytes_per_rank"]
        print(f"| {side['tp']} | {side['threads_per_rank']} | {w / 1e6:.1f} "
              f"| {w / base['weight_bytes_per_rank']:.2f}x "
              f"| {' / '.join(f'{r / 1e6:.0f}' for r in side['rss_per_rank'])} |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(p)
    p.add_argument("--tp", default="2", help="tensor parallel sizes to compare with TP=1")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads of TP=1; each of N ranks gets threads / N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cpu_build.load()
    model_path = resolve(args.model)
    caller = torch.get_num_threads()
    try:
        sides = [run_side(model_path, tp, args)
                 for tp in [1] + [int(n) for n in args.tp.split(",")]]
    finally:
        torch.set_num_threads(caller)
    print_table(sides)
    write_report(args.json, dict(config={k: str(v) for k, v in vars(args).items()},
                                 model=str(model_path), machine=machine(), sides=sides))
    return sides


if __name__ == "__main__":
    main()
