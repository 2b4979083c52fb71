"""Builds random paged batches and an independent dense oracle for the kernel tests.

Batches live on ``DEVICE``: the CPU under the Triton interpreter (the default in tests), CUDA
when the interpreter is off (scripts/gpu_check.sh runs these tests compiled on a GPU).
"""
import itertools
import os

import torch

from kernels.reference import FP8, from_cache, to_cache

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def make_batch(pairs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int = 0,
               cache_dtype: torch.dtype | None = None, scales: tuple[float, float] | None = None
               ) -> dict:
    """Random caches, queries and metadata for sequences given as (q_len, seq_len) pairs.

    Every cache slot holds random data and blocks are a random permutation of a pool with spare
    blocks, so reading a wrong block or slot changes the answer. Table padding is -1. The
    caches are of ``cache_dtype`` (default: the queries' ``dtype``); ``scales`` (k, v) go with
    an fp8 cache (its values then stand for about randn times them).
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-seq_len // block_size) for _, seq_len in pairs]
    num_blocks = sum(needed) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(needed) + 1
    tables = torch.full((len(pairs), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cache_dtype = cache_dtype or dtype
    k_scale, v_scale = scales or (1.0, 1.0)
    k_cache = to_cache(torch.randn(shape, generator=gen) * k_scale, cache_dtype, k_scale)
    v_cache = to_cache(torch.randn(shape, generator=gen) * v_scale, cache_dtype, v_scale)
    q_lens = [q for q, _ in pairs]
    num_tokens = sum(q_lens)
    # Queries as a view into a wider fused qkv buffer: token stride != num_heads * head_dim.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim,
                      generator=gen).to(DEVICE)
    query = qkv.to(dtype)[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    batch = dict(query=query, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                 seq_lens=torch.tensor([s for _, s in pairs], dtype=torch.int32),
                 query_start_loc=torch.tensor([0, *itertools.accumulate(q_lens)],
                                              dtype=torch.int32))
    batch = {k: _to_device(v) for k, v in batch.items()}
    if scales is not None:
        batch.update(k_scale=k_scale, v_scale=v_scale)
    return {**batch, "scale": head_dim ** -0.5}


def _to_device(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != FP8:
        return t.to(DEVICE)
    return t.view(torch.uint8).to(DEVICE).view(FP8)


def dense_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    scale, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Oracle: gather each sequence's K/V slot by slot, mask causally, softmax in fp32."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for s in range(len(seq_lens)):
        seq_len = int(seq_lens[s])
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        q_len = end - start
        if q_len == 0:
            continue
        k = from_cache(torch.stack([k_cache[int(block_tables[s, p // block_size]),
                                            p % block_size] for p in range(seq_len)]),
                       k_scale)                                     # [seq_len, kvh, d]
        v = from_cache(torch.stack([v_cache[int(block_tables[s, p // block_size]),
                                            p % block_size] for p in range(seq_len)]), v_scale)
        q_pos = torch.arange(seq_len - q_len, seq_len)
        allowed = q_pos[:, None] >= torch.arange(seq_len)[None, :]
        for h in range(query.shape[1]):
            kv = h // group
            scores = query[start:end, h].float() @ k[:, kv].T * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[start:end, h] = torch.softmax(scores, dim=-1) @ v[:, kv]
    return out.to(query.dtype)
