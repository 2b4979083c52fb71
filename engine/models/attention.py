"""Paged self-attention layer and the per-step batch metadata it reads."""
from dataclasses import dataclass

import torch

import kernels


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged cache; see ``kernels/reference.py`` for shapes."""
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


class PagedAttention(torch.nn.Module):
    """Stores this step's K/V into its layer's cache, then attends over the cached pages.

    An fp8 cache's per-tensor scales are 1.0, vLLM's default without calibration: e4m3 holds
    +-448 with 3 mantissa bits; K/V beyond that saturate (no calibrated scales are computed)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        kernels.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale,
                         self.v_scale)
        return kernels.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                       meta.seq_lens, meta.query_start_loc, self.scale,
                                       self.k_scale, self.v_scale)
