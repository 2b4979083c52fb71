"""Structured output's cost: decode step time with 32 constrained rows against 32 unconstrained,
and grammar compile times (cold, cached).

Both runs decode the same 32 chat prompts (the 8 JSON schemas of
tests/engine/test_structured_smollm2.py, 4 prompts each, greedy) in one batch; a step counts
only while all 32 rows decode, and the unconstrained run only over as many steps as the
constrained one had (the same positions, so the same context lengths). The runs alternate
``--repeats`` times so a change in machine load hits both. The constrained runs also time the
grammar work inside their steps: ``mask`` (filling 32 bitmask rows and applying them) and
each row's ``accept`` of its sampled token.
Compile times: TokenizerInfo (once per engine), then each schema on a fresh compiler (cold),
then the same schemas again (cached: a dict lookup and a finished future).

    python -m bench.structured [--model smollm2|DIR] [--max-tokens 48] [--repeats 2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine.sampler  # noqa: E402
from bench.models import add_model_arg, resolve  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.structured_output import GrammarCompiler, GrammarState, mask  # noqa: E402
from engine.structured_output_params import StructuredOutputsParams  # noqa: E402
from tests.engine.test_structured_smollm2 import CASES, chat  # noqa: E402

BATCH = 32


def decode_steps(llm: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> list[float]:
    """Seconds of each step in which all ``len(prompts)`` rows decode one token."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        llm.add_request(f"r{i}", prompt, p)
    times = []
    while llm.has_unfinished():
        running = llm.scheduler.running
        decoding = len(running) == len(prompts) and all(s.num_uncomputed_tokens == 1
                                                         for s in running)
        start = time.perf_counter()
        llm.step()
        if decoding:
            times.append(time.perf_counter() - start)
    return times


def timed_mask(record: list[float]):
    """``mask``, timing the calls that constrain a full batch."""
    def wrapper(logits, grammars):
        start = time.perf_counter()
        mask(logits, grammars)
        if len(grammars) == BATCH:
            record.append(time.perf_counter() - start)
    return wrapper


def timed_accept(record: list[float]):
    """``GrammarState.accept``, adding up each call's time."""
    accept = GrammarState.accept

    def wrapper(self, token):
        start = time.perf_counter()
        ok = accept(self, token)
        record.append(time.perf_counter() - start)
        return ok
    return wrapper


def compile_times(llm: LLMEngine) -> dict[str, float]:
    grammars = GrammarCompiler(llm.tokenizer, llm.runner.model.spec.vocab_size,
                               llm.eos_token_ids)
    start = time.perf_counter()
    grammars._xgr_compiler()
    info_s = time.perf_counter() - start
    params = [StructuredOutputsParams(json=schema) for _, schema in CASES]
    cold, cached = [], []
    for record in (cold, cached):
        for p in params:
            start = time.perf_counter()
            grammars.start(p).future.result()
            record.append(time.perf_counter() - start)
    grammars.close()
    return {"tokenizer_info_s": info_s, "cold_mean_s": statistics.mean(cold),
            "cold_max_s": max(cold), "cached_mean_s": statistics.mean(cached)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arg(parser)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    llm = LLMEngine(resolve(args.model), num_blocks=BATCH * 8 + 16, max_num_seqs=BATCH,
                    max_num_batched_tokens=4096, enable_prefix_caching=False)
    compiles = compile_times(llm)
    cases = [CASES[i % len(CASES)] for i in range(BATCH)]
    prompts = [chat(llm.tokenizer, q, schema) for q, schema in cases]
    free = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)] * BATCH
    constrained = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                                  structured_outputs=StructuredOutputsParams(json=schema))
                   for _, schema in cases]
    decode_steps(llm, prompts[:4], free[:4])               # warm up
    plain, structured, masks, accepts, ratios = [], [], [], [], []
    accept = GrammarState.accept
    for _ in range(args.repeats):      # alternated, so a change in machine load hits both
        plain_run = decode_steps(llm, prompts, free)
        engine.sampler.mask, GrammarState.accept = timed_mask(masks), timed_accept(accepts)
        structured_run = decode_steps(llm, prompts, constrained)
        engine.sampler.mask, GrammarState.accept = mask, accept
        plain_run = plain_run[:len(structured_run)]     # the same decode positions
        plain, structured = plain + plain_run, structured + structured_run
        ratios.append(statistics.median(structured_run) / statistics.median(plain_run))
    p_ms, s_ms = 1e3 * statistics.median(plain), 1e3 * statistics.median(structured)
    print(f"decode step, batch {BATCH}: unconstrained {p_ms:.1f} ms (median of {len(plain)}), "
          f"constrained {s_ms:.1f} ms (median of {len(structured)}), ratio {s_ms / p_ms:.3f} "
          f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)}); grammar work per step: "
          f"mask (fill + apply, 32 rows) {1e3 * statistics.median(masks):.2f} ms, "
          f"accept (32 rows) {1e3 * BATCH * statistics.median(accepts):.2f} ms")
    print(f"grammar compile: TokenizerInfo {1e3 * compiles['tokenizer_info_s']:.0f} ms once; "
          f"cold {1e3 * compiles['cold_mean_s']:.1f} ms mean, "
          f"{1e3 * compiles['cold_max_s']:.1f} ms max over {len(CASES)} schemas; "
          f"cached {1e6 * compiles['cached_mean_s']:.0f} us")


if __name__ == "__main__":
    main()
