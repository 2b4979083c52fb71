"""The transformers baselines a benchmark compares our engine with, on a shared workload.

Owns (1) transformers' continuous batching (the manager API, so each request gets its own
``max_new_tokens``) with an explicit KV pool and token budget, and (2) static padded
``generate`` in fixed batches, which is what a TorchServe static-batching handler does. Both
run greedy with EOS disabled so every request produces exactly its target length; both report
per-token timestamps. Nothing here knows our engine.
"""
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.metrics import SystemResult, peak_rss_gib
from bench.workload import Request


def load_hf(model_path, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """The checkpoint in transformers, with EOS disabled so outputs reach their targets."""
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.config.eos_token_id = None
    return hf


def _warmup_requests(workload: list[Request]) -> list[Request]:
    return [Request(f"warm-{i}", r.prompt_ids[:8], 4) for i, r in enumerate(workload[:2])]


def run_hf_cb(hf, workload: list[Request], block_size: int, num_blocks: int,
              max_batch_tokens: int, max_batch_requests: int, num_sanity: int) -> SystemResult:
    """transformers' continuous batching with our KV pool size and token budget, EOS off."""
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=hf.config.pad_token_id)
    cb = ContinuousBatchingConfig(page_size=block_size, num_blocks=num_blocks,
                                  max_batch_tokens=max_batch_tokens,
                                  max_requests_per_batch=max_batch_requests,
                                  allow_block_sharing=False, seed=0)
    res = SystemResult("hf_cb", wall_s=0.0, num_requests=len(workload), output_tokens=0,
                       peak_batch=0, preemptions=0)
    with hf.continuous_batching_context_manager(generation_config=gen, block=True, timeout=5,
                                                continuous_batching_config=cb) as manager:
        _collect(manager, _warmup_requests(workload), None)
        _observe(manager, res, torch.get_num_threads())
        start = time.perf_counter()
        outs = _collect(manager, workload, res)
        res.wall_s = time.perf_counter() - start
        res.note = (f"attention {hf.config._attn_implementation}, "
                    f"{manager.batch_processor.cache.num_blocks} blocks of {block_size}")
    res.token_times_s = [[t - start for t in o.timestamps] for o in outs]
    res.tokens_per_request = [len(o.generated_tokens) for o in outs]
    res.output_tokens = sum(res.tokens_per_request)
    res.first_tokens = [list(o.generated_tokens) for o in outs[:num_sanity]]
    res.peak_rss_gib = peak_rss_gib()
    return res


def _collect(manager, requests: list[Request], res: SystemResult | None) -> list:
    """Submit ``requests`` and wait for all of them; results in the requests' order."""
    for r in requests:
        manager.add_request(r.prompt_ids, request_id=r.request_id, max_new_tokens=r.output_len,
                            record_timestamps=True, eos_token_id=-1)
    done = {}
    with tqdm(total=len(requests), desc="hf_cb", unit="req", disable=res is None) as bar:
        while len(done) < len(requests):
            out = manager.get_result(timeout=600)     # a long request on a busy CPU
            if out is None:
                raise RuntimeError(f"transformers CB stalled with {len(done)}/{len(requests)} done")
            if out.error is not None:
                raise RuntimeError(f"transformers CB failed {out.request_id}: {out.error}")
            if out.is_finished():
                done[out.request_id] = out
                bar.update(1)
    return [done[r.request_id] for r in requests]


def _observe(manager, res: SystemResult, threads: int) -> None:
    """Sample batch size and KV usage before every step and count offloaded (preempted)
    requests, by wrapping this manager's own step and offload hooks (private API, 5.x).
    Also gives its generation thread the same intra-op thread count as the caller's."""
    processor = manager.batch_processor
    step, offload = manager._generation_step, processor.offloading_manager._offload_to_cpu

    def observed_step():
        if torch.get_num_threads() != threads:    # runs on transformers' own loop thread
            torch.set_num_threads(threads)
        cache = processor.cache
        held = sum(len(t) for a in cache.cache_allocators.values() for t in a.block_table.values())
        total = sum(a.num_blocks for a in cache.cache_allocators.values())
        res.peak_batch = max(res.peak_batch, len(processor.scheduler.active_requests))
        res.kv_usage.append(held / total)
        step()

    def counted_offload(offloaded, *rest):
        res.preemptions += len(offloaded)
        return offload(offloaded, *rest)

    manager._generation_step = observed_step
    processor.offloading_manager._offload_to_cpu = counted_offload


class _StepClock(BaseStreamer):
    """Records when ``generate`` emits each new column of tokens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_hf_static(hf, workload: list[Request], batch_size: int, num_sanity: int) -> SystemResult:
    """Fixed batches, left padding, each batch runs to its longest target; only targets count."""
    pad = hf.config.pad_token_id

    def generate(batch: list[Request], clock: BaseStreamer | None) -> torch.Tensor:
        width = max(r.prompt_len for r in batch)
        ids = torch.tensor([[pad] * (width - r.prompt_len) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in batch])
        ids, mask = ids.to(hf.device), mask.to(hf.device)
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                          max_new_tokens=max(r.output_len for r in batch), streamer=clock)
        return out[:, width:]

    generate(_warmup_requests(workload), None)
    times: list[list[float]] = []
    tokens: list[list[int]] = []
    start = time.perf_counter()
    for b in tqdm(range(0, len(workload), batch_size), desc="hf_static", unit="batch"):
        batch, clock = workload[b:b + batch_size], _StepClock()
        new = generate(batch, clock)
        for r, row in zip(batch, new.tolist()):
            assert len(row) >= r.output_len, "static generate stopped early (EOS not disabled?)"
            times.append([t - start for t in clock.times[:r.output_len]])
            tokens.append(row[:r.output_len])
    wall = time.perf_counter() - start
    counts = [len(t) for t in tokens]
    return SystemResult("hf_static", wall_s=wall, num_requests=len(workload),
                        output_tokens=sum(counts), tokens_per_request=counts, token_times_s=times,
                        peak_batch=batch_size, first_tokens=tokens[:num_sanity],
                        peak_rss_gib=peak_rss_gib(), note=f"batches of {batch_size}, left-padded")
