"""Parallel sampling benchmark: one request with ``n`` choices against ``n`` separate requests.

Same engine settings, same prompt, seeded sampling with every output forced to its length:
(1) one request with ``n`` choices (prompt prefilled once, blocks shared copy-on-write);
(2) ``n`` requests seeded ``seed + i``, added together, prefix caching on (the default: a
request admitted in a later step than another reuses its full prompt blocks; requests admitted
in the same step share nothing). Each runs on a fresh engine (cold prefix cache) after a short
warm-up. It prints wall time, prefill rows the model computed (prompt tokens, recomputes
included), peak KV blocks, the ratios, and whether the tokens agree (they must: choice i
equals the request seeded ``seed + i``). Only the model's ``forward`` is wrapped, to count
the rows it computes.

    python bench/parallel_sampling.py --model smollm2 --prompt-tokens 512 --n 4 \\
        --max-tokens 32 --threads 1
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import random
import time

import torch

from bench.metrics import write_report
from bench.models import add_model_arg, resolve
from engine import LLMEngine, SamplingParams


def run(llm: LLMEngine, requests: dict[str, SamplingParams], prompt: list[int]) -> dict:
    """Step ``requests`` (all added at once) to the end: time, computed rows, peak blocks."""
    rows = 0
    forward = llm.runner.model.forward

    def counting_forward(input_ids, positions, meta):
        nonlocal rows
        rows += input_ids.numel()
        return forward(input_ids, positions, meta)

    llm.runner.model.forward = counting_forward
    tokens: dict[tuple[str, int], list[int]] = {}
    peak = 0
    start = time.perf_counter()
    try:
        for rid, params in requests.items():
            llm.add_request(rid, prompt, params)
        while llm.has_unfinished():
            for out in llm.step():
                tokens.setdefault((out.request_id, out.index), []).extend(out.token_ids)
            peak = max(peak, llm.allocator.num_used)
    finally:
        llm.runner.model.forward = forward
    wall_s = time.perf_counter() - start
    generated = sum(len(t) for t in tokens.values())
    # every row but the decode inputs (each generated token except a choice's last)
    prefill = rows - (generated - len(tokens))
    return {"wall_s": wall_s, "rows_computed": rows, "prefill_rows": prefill,
            "peak_blocks": peak, "tokens": [tokens[k] for k in sorted(tokens)]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(ap)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-blocks", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine_args = dict(num_blocks=args.num_blocks, max_num_seqs=max(8, args.n),
                       max_num_batched_tokens=args.max_num_batched_tokens)
    base = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True)
    systems = {"n": {"r": base.model_copy(update={"n": args.n, "seed": args.seed})},
               "separate": {f"r{i}": base.model_copy(update={"seed": args.seed + i})
                            for i in range(args.n)}}
    results = {}
    for name, requests in systems.items():
        llm = LLMEngine(resolve(args.model), **engine_args)
        rng = random.Random(args.seed)
        prompt = [rng.randrange(3, llm.runner.model.spec.vocab_size)
                  for _ in range(args.prompt_tokens)]
        run(llm, {"warmup": base.model_copy(update={"max_tokens": 2})}, prompt[:8][::-1])
        results[name] = run(llm, requests, prompt)
        del llm
    same = results["n"]["tokens"] == results["separate"]["tokens"]
    ratios = {name: results["separate"][name] / results["n"][name]
              for name in ("wall_s", "prefill_rows", "peak_blocks")}
    print(f"prompt {args.prompt_tokens} tokens, n={args.n}, {args.max_tokens} new tokens each, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}, threads {args.threads}")
    print(f"{'':>10} {'wall s':>8} {'prefill rows':>12} {'peak blocks':>12}")
    for name, r in results.items():
        print(f"{name:>10} {r['wall_s']:8.2f} {r['prefill_rows']:12d} {r['peak_blocks']:12d}")
    print("separate / n: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"tokens identical (choice i == request seeded seed+i): {same}")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "ratios": ratios,
              "identical": same,
              "results": {k: {m: v for m, v in r.items() if m != "tokens"}
                          for k, r in results.items()}}
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
