"""Triton paged-attention micro-benchmark on one CUDA device (needs a GPU; exits without one).

Decode: achieved bandwidth (bytes of K/V read plus queries and outputs, over kernel time) for a
grid of batch sizes and contexts, next to the device's measured device-to-device copy
bandwidth, with the flash-decoding split count the heuristic picked. Prefill: time of a whole
causal prompt through the paged kernel against ``torch.nn.functional.scaled_dot_product_attention``
on contiguous K/V (GQA heads repeated beforehand, outside the timing). Times are CUDA events
around ``--iters`` back-to-back launches, so small shapes include Python launch cost.

    python bench/kernels.py --dtype bf16 --heads 32 --kv-heads 8 --head-dim 128
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `kernels` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from collections.abc import Callable

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def time_ms(fn: Callable[[], object], iters: int) -> float:
    """Mean milliseconds per call, by CUDA events around ``iters`` calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth_gbs(iters: int) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def paged_inputs(q_lens: list[int], seq_lens: list[int], args: argparse.Namespace,
                 dtype: torch.dtype) -> dict:
    """Random caches holding exactly the sequences' blocks, in a shuffled order."""
    per_seq = [-(-n // args.block_size) for n in seq_lens]
    num_blocks = sum(per_seq)
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    order = torch.randperm(num_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[used:used + n]
        used += n
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    query = torch.randn(sum(q_lens), args.heads, args.head_dim, dtype=dtype, device="cuda")
    return dict(query=query,
                k_cache=torch.randn(shape, dtype=dtype, device="cuda"),
                v_cache=torch.randn(shape, dtype=dtype, device="cuda"),
                block_tables=tables.cuda(),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                query_start_loc=starts.cuda(), scale=args.head_dim ** -0.5)


def bench_decode(args: argparse.Namespace, dtype: torch.dtype, copy_gbs: float) -> None:
    from kernels.triton_paged_attention import choose_num_kv_splits, paged_attention_triton
    elem = torch.empty(0, dtype=dtype).element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"\nDecode ({args.heads} heads, {args.kv_heads} KV heads, head_dim {args.head_dim}, "
          f"block {args.block_size}); device copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'batch':>6} {'context':>8} {'splits':>6} {'time_us':>9} {'GB/s':>8} {'of copy':>8}")
    for batch in args.batches:
        for context in args.contexts:
            inputs = paged_inputs([1] * batch, [context] * batch, args, dtype)
            splits = choose_num_kv_splits(batch, batch, args.kv_heads,
                                          inputs["block_tables"].shape[1] * args.block_size, sms)
            ms = time_ms(lambda: paged_attention_triton(**inputs), args.iters)
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elem
            qo_bytes = 2 * batch * args.heads * args.head_dim * elem
            gbs = (kv_bytes + qo_bytes) / (ms * 1e-3) / 1e9
            print(f"{batch:>6} {context:>8} {splits:>6} {ms * 1e3:>9.1f} {gbs:>8.0f} "
                  f"{gbs / copy_gbs:>8.0%}")
            del inputs
            torch.cuda.empty_cache()


def bench_prefill(args: argparse.Namespace, dtype: torch.dtype) -> None:
    from torch.nn.functional import scaled_dot_product_attention

    from kernels.triton_paged_attention import paged_attention_triton
    group = args.heads // args.kv_heads
    print("\nPrefill (batch 1, causal, whole prompt; SDPA on contiguous K/V)")
    print(f"{'prompt':>7} {'paged_ms':>9} {'sdpa_ms':>8} {'ratio':>6}")
    for length in args.prompts:
        inputs = paged_inputs([length], [length], args, dtype)
        ms = time_ms(lambda: paged_attention_triton(**inputs), args.iters)
        q = inputs["query"].transpose(0, 1).unsqueeze(0)                       # 1 h L d
        k = torch.randn(1, args.kv_heads, length, args.head_dim, dtype=dtype, device="cuda")
        v = torch.randn_like(k)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        sdpa_ms = time_ms(lambda: scaled_dot_product_attention(q, k, v, is_causal=True),
                          args.iters)
        print(f"{length:>7} {ms:>9.3f} {sdpa_ms:>8.3f} {ms / sdpa_ms:>6.2f}")
        del inputs, q, k, v
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels: no CUDA device found; this benchmark times GPU kernels only.")
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    print(f"Device: {torch.cuda.get_device_name()}  dtype: {args.dtype}")
    copy_gbs = copy_bandwidth_gbs(args.iters)
    bench_decode(args, dtype, copy_gbs)
    bench_prefill(args, dtype)


if __name__ == "__main__":
    main()
