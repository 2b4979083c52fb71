"""Paged attention and KV store on CPU through the compiled kernels of ``kernels/cpu/``.

Every decode row of the step (query length 1) goes through one compiled call per layer that
reads each sequence's K/V blocks in place with an online softmax; prefill chunks (query length
> 1) get the reference's gather and SDPA per sequence, in C++, where a GEMM-shaped kernel is
what pays. Same signature and result as ``kernels.reference.paged_attention_reference``. The
store writes each token's K/V rows into their slots in one compiled loop (``cpu/store_kv.cpp``),
rounding them to the cache's dtype. The caches may be fp32, fp16 or bf16 (decode reads them as
fp32 for fp32 queries); fp8 caches go to the reference.
"""
import torch

from kernels.reference import paged_attention_reference, store_kv_reference

__all__ = ["paged_attention_cpu", "store_kv_cpu"]

COMPILED = (torch.float32, torch.float16, torch.bfloat16)     # element types the kernels take


def store_kv_cpu(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> None:
    """Write each token's K/V into its cache slot; slots of -1 are skipped."""
    if (key.dtype == value.dtype and key.dtype in COMPILED and k_cache.dtype in COMPILED
            and v_cache.dtype == k_cache.dtype
            and slot_mapping.dtype in (torch.int32, torch.long)):
        torch.ops.tsllm_cpu.store_kv(key.contiguous(), value.contiguous(), k_cache, v_cache,
                                     slot_mapping)
    else:
        store_kv_reference(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of each sequence's queries over its paged K/V; returns query's shape."""
    if k_cache.dtype not in COMPILED or query.dtype not in (torch.float32, k_cache.dtype):
        return paged_attention_reference(query, k_cache, v_cache, block_tables, seq_lens,
                                         query_start_loc, scale, k_scale, v_scale)
    out = torch.empty_like(query)
    torch.ops.tsllm_cpu.paged_decode(query, k_cache, v_cache, block_tables, seq_lens,
                                     query_start_loc, scale, out)
    if query.shape[0] > seq_lens.shape[0]:      # some sequence has a prefill chunk
        torch.ops.tsllm_cpu.paged_prefill(query, k_cache, v_cache, block_tables, seq_lens,
                                          query_start_loc, scale, out)
    return out
