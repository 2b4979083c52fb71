"""Triton KV store against the reference and a slot-by-slot oracle, on CPU (interpreter)."""
import pytest
import torch
from paged_batch import DEVICE

from kernels.reference import store_kv_reference
from kernels.triton_store_kv import store_kv_triton


def oracle(key, value, k_cache, v_cache, slot_mapping) -> None:
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = key[token].to(k_cache.dtype)
            v_cache[slot // block_size, slot % block_size] = value[token].to(v_cache.dtype)


@pytest.mark.parametrize("same_dtype", [False, True])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 16, 16), (3, 80, 32),
                                                               (2, 128, 16)])
def test_store_kv(num_kv_heads: int, head_dim: int, block_size: int,
                  cache_dtype: torch.dtype, same_dtype: bool) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    num_blocks, num_tokens = 4, 11
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(cache_dtype) for _ in range(2)]
    # K and V as views of a fused qkv buffer, in fp32 (the store casts) or the cache dtype.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen)
    qkv = (qkv.to(cache_dtype) if same_dtype else qkv).to(DEVICE)
    key = qkv[:, :num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 2 * num_kv_heads * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int64)
    slots[[0, 4, 10]] = -1
    # The last slot of the pool is written too, so the edge of the cache is covered.
    slots[5] = num_blocks * block_size - 1

    caches, slots = [c.to(DEVICE) for c in caches], slots.to(DEVICE)
    expected = [c.clone() for c in caches]
    oracle(key, value, *expected, slots)
    ref = [c.clone() for c in caches]
    store_kv_reference(key, value, *ref, slots)
    out = [c.clone() for c in caches]
    store_kv_triton(key, value, *out, slots.to(torch.int32))
    for e, r, o in zip(expected, ref, out):
        assert torch.equal(r, e)
        if cache_dtype == torch.bfloat16 and not same_dtype:
            # The interpreter truncates fp32 -> bf16 where GPUs round to nearest: within 1 ulp.
            torch.testing.assert_close(o, e, atol=0.0, rtol=2 ** -7)
        else:
            assert torch.equal(o, e)


def test_store_kv_all_skipped_and_empty() -> None:
    cache = torch.randn(2, 16, 1, 16, device=DEVICE)
    before = cache.clone()
    key = torch.randn(3, 1, 16, device=DEVICE)
    store_kv_triton(key, key, cache, cache, torch.full((3,), -1, dtype=torch.int32,
                                                       device=DEVICE))
    store_kv_triton(key[:0], key[:0], cache, cache, torch.zeros(0, dtype=torch.int32,
                                                                device=DEVICE))
    assert torch.equal(cache, before)
