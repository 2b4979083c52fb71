"""Tensor-parallel benchmark: the engine with ``tensor_parallel_size`` N against one rank,
in-process on CPU (gloo), on the same model and workload.

Every side (TP=1 and each N of ``--tp``) is one engine, all loaded at once in this process
(the followers in their own), and each runs bench/engine_decode.py's fixed-batch workload in
turn, batch size by batch size (so that a change of the machine's load hits every side
alike): B prompts of ``--prompt-len`` tokens prefilled in one step, then decoded to
``--gen-len`` tokens (greedy, ignore_eos), for each B of ``--batches``. TP=1 gets every
thread of ``--threads`` (default: all cores); each of N ranks gets threads / N, as the engine
splits them. Reports prefill and decode tok/s, the bytes of packed weights per rank (each
rank's shard: linears, embedding and head) and memory (the RSS that loading the engine added
to this process, rank 0; each follower's whole RSS), then the ratios TP=N / TP=1.
On a shared machine compare the sides only within one run.

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


def rss_per_rank(llm: LLMEngine, before: int) -> list[int]:
    """Resident bytes that loading ``llm`` added to this process (rank 0; ``before``: its RSS
    then), and each follower process's whole RSS (its Python and torch included)."""
    pids = [p.pid for p in llm.ranks.processes] if llm.ranks else []
    return [_rss(os.getpid()) - before] + [_rss(pid) for pid in pids]


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def run_sides(model_path: Path, sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """One engine per tensor parallel size, every batch size on each in turn."""
    batches = [int(b) for b in args.batches.split(",")]
    engines, sides = {}, []
    try:
        for tp in sizes:
            threads, before = max(1, args.threads // tp), _rss(os.getpid())
            engines[tp] = make_engine(model_path, batches, args.prompt_len, args.gen_len,
                                      threads, "auto", tensor_parallel_size=tp)
            sides.append(dict(tp=tp, threads_per_rank=threads, rows=[],
                              weight_bytes_per_rank=weight_bytes(engines[tp]),
                              rss_per_rank=rss_per_rank(engines[tp], before)))
        for side in sides:      # warm-up
            _use(side)
            engines[side["tp"]].generate(
                [[5] * 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                use_tqdm=False)
        for b in batches:
            for side in sides:
                _use(side)
                row = run_batch(engines[side["tp"]], b, args.prompt_len, args.gen_len,
                                args.seed)
                side["rows"].append(row)
                print(f"TP={side['tp']} batch {b}: prefill {row['prefill_tok_s']:.0f} tok/s, "
                      f"decode {row['decode_tok_s']:.1f} tok/s (TPOT {row['tpot_ms']:.1f} ms)",
                      flush=True)
        return sides
    finally:
        for llm in engines.values():
            llm.close()


def _use(side: dict) -> None:
    """This side's threads in this process (torch's are process-wide; followers keep their
    own)."""
    torch.set_num_threads(side["threads_per_rank"])


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
    print("| TP | threads per rank | weight MB per rank | vs TP=1 "
          "| RSS MB: added to rank 0 / each follower's |")
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
        sides = run_sides(model_path, [1] + [int(n) for n in args.tp.split(",")], args)
    finally:
        torch.set_num_threads(caller)
    print_table(sides)
    write_report(args.json, dict(config={k: str(v) for k, v in vars(args).items()},
                                 model=str(model_path), machine=machine(), sides=sides))
    return sides


if __name__ == "__main__":
    main()
