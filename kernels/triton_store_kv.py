"""Triton KV-cache store: writes each new token's K/V into its paged cache slot.

Same signature and semantics as ``store_kv_reference`` in ``kernels/reference.py``. One program
per (token, KV head), so the compiled variant depends only on dtypes and the padded head size.
An fp8 cache comes as bytes (``kernels/triton_fp8.py``): K/V times the reciprocal scales, in
e4m3.
Importing this module imports triton; ``kernels/__init__.py`` only does so when it is used.
"""
import torch
import triton
import triton.language as tl

from kernels.reference import FP8
from kernels.triton_fp8 import to_e4m3
from kernels.triton_launch import Launch, check_aligned, check_head_dim


@triton.jit(do_not_specialize=["block_shift"])
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_shift,
                     head_dim, k_inv, v_inv, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     DIM_P: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot >> block_shift
    offset = slot & ((1 << block_shift) - 1)
    dims = tl.arange(0, DIM_P)
    mask = dims < head_dim
    token = token.to(tl.int64)

    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + dims, mask=mask)
    if k_cache_ptr.dtype.element_ty == tl.uint8:        # fp8 e4m3, scaled
        k = to_e4m3(k.to(tl.float32) * k_inv)
        v = to_e4m3(v.to(tl.float32) * v_inv)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + head * stride_kch + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + head * stride_vch + dims
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def plan_store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> list[Launch]:
    """The launch that computes ``store_kv_triton`` (none for an empty step)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = k_cache.shape[1]
    assert value.shape == key.shape and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be dense"
    check_head_dim(head_dim)
    if num_tokens == 0:
        return []
    key, value = _unit_last(key), _unit_last(value)
    if k_cache.dtype == FP8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    check_aligned(key, value, k_cache, v_cache, slot_mapping)
    return [Launch(_store_kv_kernel, (num_tokens, num_kv_heads), dict(
        key_ptr=key, value_ptr=value, k_cache_ptr=k_cache, v_cache_ptr=v_cache,
        slot_ptr=slot_mapping, block_shift=block_size.bit_length() - 1, head_dim=head_dim,
        k_inv=1.0 / k_scale, v_inv=1.0 / v_scale,
        stride_kt=key.stride(0), stride_kh=key.stride(1),
        stride_vt=value.stride(0), stride_vh=value.stride(1),
        stride_kcb=k_cache.stride(0), stride_kcs=k_cache.stride(1), stride_kch=k_cache.stride(2),
        stride_vcb=v_cache.stride(0), stride_vcs=v_cache.stride(1), stride_vch=v_cache.stride(2)),
        dict(DIM_P=triton.next_power_of_2(head_dim)), {"num_warps": 1})]


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> None:
    """Write each token's K/V into its cache slot; slots of -1 are skipped."""
    for launch in plan_store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
        launch()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
