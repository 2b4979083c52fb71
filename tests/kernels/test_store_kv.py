"""Triton KV store against the reference and a slot-by-slot oracle, on CPU (interpreter)."""
import pytest
import torch
from paged_batch import DEVICE

from kernels.reference import FP8, store_kv_reference
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


@pytest.mark.parametrize("source", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 2.5)])
def test_store_kv_fp8_matches_the_reference_bit_for_bit(source: torch.dtype,
                                                        scales: tuple[float, float]) -> None:
    """e4m3 with per-tensor scales: round to nearest even (ties, subnormals), saturation at
    +-448 (not NaN), signed zeros, NaN kept."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, kv_heads, dim = 11, 2, 48
    key = torch.randn(num_tokens, kv_heads, dim, generator=gen) * 30
    specials = [449.0, 464.0, 480.0, 1e9, -1e9, float("inf"), 2 ** -7, 2 ** -10, 1.5 * 2 ** -9,
                2.5 * 2 ** -9, 0.99 * 2 ** -6, 0.0, -0.0, 1.0625, 1.1875, 1e-30, float("nan"),
                3 * 2 ** -10, -300.0]
    key.view(-1)[:len(specials)] = torch.tensor(specials) * scales[0]
    value = torch.randn(num_tokens, kv_heads, dim, generator=gen)
    key, value = key.to(source).to(DEVICE), value.to(source).to(DEVICE)
    slots = torch.randperm(64, generator=gen)[:num_tokens]
    slots[2] = -1
    caches = [torch.zeros(4, 16, kv_heads, dim, dtype=FP8, device=DEVICE) for _ in range(4)]
    store_kv_reference(key, value, caches[0], caches[1], slots.to(DEVICE), *scales)
    store_kv_triton(key, value, caches[2], caches[3], slots.to(DEVICE, torch.int32), *scales)
    for ref, out in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ref.view(torch.uint8), out.view(torch.uint8))
    bytes_ = caches[0].view(torch.uint8).view(-1, kv_heads, dim)[slots[0]]
    assert (bytes_ & 0x7F).max() == 0x7F                        # the NaN
    assert ((bytes_ & 0x7F) == 0x7E).sum() >= 5                 # 448: saturated, not NaN
