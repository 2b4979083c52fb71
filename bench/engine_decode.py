"""In-process decode speed of our engine at fixed batch sizes, the way llama-batched-bench counts.

For each batch size B: B distinct random prompts of ``prompt_len`` tokens are prefilled in one
step (the token budget is raised to fit them all), then every sequence decodes until it has
``gen_len`` tokens (greedy, ignore_eos). Prefill tok/s = B * prompt_len / first step; decode
tok/s = B * (gen_len - 1) / the decode steps, TPOT = their mean. Optionally a torch.profiler
table of a few decode steps per batch size, and a bandwidth probe run between the decode steps
(outside their timing). It never touches TorchServe or llama.cpp.
"""
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import kernels
from engine import LLMEngine, SamplingParams


def make_engine(model_path: Path, batches: list[int], prompt_len: int, gen_len: int,
                threads: int, backend: str, dtype: str = "float32",
                kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1) -> LLMEngine:
    """One engine sized for the largest batch: a KV pool that never preempts, one prefill step
    (``threads`` per rank)."""
    block_size = 16
    per_seq = -(-(prompt_len + gen_len) // block_size)
    return LLMEngine(model_path, block_size=block_size, num_blocks=max(batches) * per_seq + 8,
                     max_num_seqs=max(batches),
                     max_num_batched_tokens=max(512, max(batches) * prompt_len),
                     enable_prefix_caching=False, num_threads=threads,
                     attention_backend=backend, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                     device="cpu", tensor_parallel_size=tensor_parallel_size)


def run_batch(llm: LLMEngine, batch: int, prompt_len: int, gen_len: int, seed: int,
              profile_dir: Path | None = None, probe: Callable[[], float] | None = None,
              probe_every: int = 16) -> dict:
    """Prefill ``batch`` prompts at once, decode to ``gen_len`` tokens; the timings. ``probe``
    (a bandwidth probe, GB/s) runs before the first decode step, after every ``probe_every``
    and after the last, outside the steps' timing; its readings are returned too."""
    rng = np.random.default_rng(seed + batch)
    vocab = llm.runner.model.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    for i in range(batch):
        llm.add_request(f"b{batch}-{i}", rng.integers(4, vocab, prompt_len).tolist(), params)
    start = time.perf_counter()
    first = llm.step()
    prefill_s = time.perf_counter() - start
    assert len(first) == batch, f"prefill of {batch} prompts took more than one step"
    step_s, probe_gbs = [], []
    while llm.has_unfinished():
        if profile_dir is not None and len(step_s) == gen_len // 2:
            _profile(llm, batch, profile_dir)
            profile_dir = None
            continue
        if probe is not None and len(step_s) % probe_every == 0:
            probe_gbs.append(probe())
        t = time.perf_counter()
        llm.step()
        step_s.append(time.perf_counter() - t)
    if probe is not None:
        probe_gbs.append(probe())
    decode_s = sum(step_s)
    tokens = batch * len(step_s)
    return dict(batch=batch, prefill_s=prefill_s, prefill_tok_s=batch * prompt_len / prefill_s,
                decode_steps=len(step_s), decode_s=decode_s, decode_tok_s=tokens / decode_s,
                tpot_ms=1e3 * decode_s / len(step_s),
                tpot_p50_ms=1e3 * float(np.median(step_s))) | (
                    dict(probe_gbs=probe_gbs) if probe is not None else {})


def _profile(llm: LLMEngine, batch: int, out_dir: Path, steps: int = 3) -> None:
    """A torch.profiler table of ``steps`` decode steps (they still count as generated)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            llm.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out_dir / f"decode_b{batch}.txt").write_text(f"{steps} decode steps at batch {batch}\n"
                                                  + table + "\n")


def run_engine(model_path: Path, batches: list[int], prompt_len: int, gen_len: int,
               threads: int, backend: str = "auto", seed: int = 0,
               profile_dir: Path | None = None, probe: Callable[[], float] | None = None,
               dtype: str = "float32", kv_cache_dtype: str = "auto") -> list[dict]:
    """Every batch size in turn on one engine (after a short warm-up); ``probe`` (see
    ``run_batch``) runs between the batch-1 decode steps."""
    caller, caller_backend = torch.get_num_threads(), kernels.get_backend()
    kernels.set_backend(backend)
    try:
        llm = make_engine(model_path, batches, prompt_len, gen_len, threads, backend, dtype,
                          kv_cache_dtype)
        llm.generate([[5] * 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
        rows = []
        for b in batches:
            rows.append(run_batch(llm, b, prompt_len, gen_len, seed, profile_dir,
                                  probe if b == 1 else None))
            print(f"engine ({backend}, {dtype}, cache {kv_cache_dtype}) batch {b}: prefill {rows[-1]['prefill_tok_s']:.0f} tok/s, "
                  f"decode {rows[-1]['decode_tok_s']:.1f} tok/s (TPOT {rows[-1]['tpot_ms']:.1f} ms)",
                  flush=True)
        assert llm.allocator.num_free == llm.allocator.num_blocks
        return rows
    finally:
        torch.set_num_threads(caller)
        kernels.set_backend(caller_backend)
