"""Triton paged attention against the PyTorch reference and a dense oracle, on CPU (interpreter)."""
import pytest
import torch
from paged_batch import dense_attention, make_batch

from kernels.reference import FP8, paged_attention_reference
from kernels.triton_paged_attention import choose_num_kv_splits, paged_attention_triton

# Both sides accumulate in fp32; the tolerance covers exp2 vs exp and one rounding of the output.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4),
       torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
MIXED = [(1, 37), (5, 18), (33, 70), (16, 16)]


def check(batch: dict, dtype: torch.dtype, **overrides) -> None:
    oracle = dense_attention(**batch)
    ref = paged_attention_reference(**batch)
    out = paged_attention_triton(**batch, **overrides)
    assert out.shape == batch["query"].shape and out.dtype == dtype
    torch.testing.assert_close(ref, oracle, **TOL[dtype])
    torch.testing.assert_close(out, oracle, **TOL[dtype])
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 5])
def test_mixed_batch(group: int, dtype: torch.dtype) -> None:
    batch = make_batch(MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=16,
                       dtype=dtype, seed=group)
    check(batch, dtype)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype,group", [(torch.float32, 4), (torch.bfloat16, 5)])
def test_mixed_batch_split_kv(dtype: torch.dtype, group: int, splits: int) -> None:
    """Splitting is valid for prefill tiles too, so forcing it on a mixed batch is a fair test."""
    batch = make_batch(MIXED, num_heads=group, num_kv_heads=1, head_dim=16, block_size=16,
                       dtype=dtype, seed=splits)
    check(batch, dtype, num_kv_splits=splits)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_block_boundaries(block_size: int, head_dim: int) -> None:
    """Lengths on and one past block boundaries, seq_len 1, chunks spanning several blocks."""
    pairs = [(1, 1), (1, block_size), (1, block_size + 1), (2, 2 * block_size),
             (block_size + 1, 2 * block_size + 1), (3, block_size + 3)]
    batch = make_batch(pairs, num_heads=4, num_kv_heads=1, head_dim=head_dim,
                       block_size=block_size, dtype=torch.float16, seed=head_dim)
    check(batch, torch.float16)


@pytest.mark.parametrize("block_q", [1, 2, 8])
def test_query_tiles(block_q: int) -> None:
    """Several query tiles per sequence, tiles ending mid-sequence, and an empty sequence."""
    pairs = [(9, 40), (0, 5), (17, 17), (1, 3)]
    batch = make_batch(pairs, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                       dtype=torch.float32, seed=block_q)
    out = paged_attention_triton(**batch, block_q=block_q)
    torch.testing.assert_close(out, dense_attention(**batch), **TOL[torch.float32])


@pytest.mark.parametrize("splits", [None, 1, 2, 4, 7])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_split_kv(group: int, splits: int | None) -> None:
    """Decode-only batch: the heuristic's pick, split off, and more splits than some need."""
    pairs = [(1, 1), (1, 17), (1, 32), (1, 33), (1, 300)]
    batch = make_batch(pairs, num_heads=2 * group, num_kv_heads=2, head_dim=32,
                       block_size=16, dtype=torch.bfloat16, seed=group)
    check(batch, torch.bfloat16, num_kv_splits=splits)


def test_heuristic_picks_both_paths() -> None:
    # Default tests on CPU assume 8 SMs: a small decode batch over a long table splits.
    assert choose_num_kv_splits(num_seqs=5, num_tokens=5, num_kv_heads=2, max_context=320,
                                num_sms=8) == 1
    assert choose_num_kv_splits(num_seqs=1, num_tokens=1, num_kv_heads=8, max_context=8192,
                                num_sms=132) == 32
    assert choose_num_kv_splits(num_seqs=8, num_tokens=8, num_kv_heads=8, max_context=8192,
                                num_sms=132) == 4
    assert choose_num_kv_splits(num_seqs=2, num_tokens=2, num_kv_heads=2, max_context=1024,
                                num_sms=8) == 4
    # Prefill in the batch, enough programs already, or a short context: no split.
    assert choose_num_kv_splits(num_seqs=2, num_tokens=40, num_kv_heads=2, max_context=8192,
                                num_sms=132) == 1
    assert choose_num_kv_splits(num_seqs=256, num_tokens=256, num_kv_heads=8,
                                max_context=8192, num_sms=132) == 1
    assert choose_num_kv_splits(num_seqs=1, num_tokens=1, num_kv_heads=8, max_context=300,
                                num_sms=132) == 1


def test_default_heuristic_splits_long_decode() -> None:
    """Without overrides a small decode batch over a long context takes the split path."""
    batch = make_batch([(1, 600), (1, 5)], num_heads=1, num_kv_heads=1, head_dim=16,
                       block_size=32, dtype=torch.float32)
    assert choose_num_kv_splits(2, 2, 1, batch["block_tables"].shape[1] * 32, 8) > 1
    check(batch, torch.float32)


def test_native_dtype_dot_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path feeds fp16 straight to tl.dot (probabilities rounded to fp16 for P @ V).

    The interpreter computes fp16 dots correctly (unlike bf16), so this path is checked here too.
    """
    import kernels.triton_paged_attention as module
    monkeypatch.setattr(module, "_DOT_FP32", False)
    batch = make_batch(MIXED, num_heads=4, num_kv_heads=1, head_dim=32, block_size=16,
                       dtype=torch.float16, seed=7)
    oracle = dense_attention(**batch)
    for splits in (1, 3):
        out = paged_attention_triton(**batch, num_kv_splits=splits)
        torch.testing.assert_close(out, oracle, atol=4e-3, rtol=4e-3)


def test_int64_metadata() -> None:
    """Metadata in int64 (a caller's torch default) gives the same answer as int32."""
    batch = make_batch([(3, 20), (1, 9)], num_heads=2, num_kv_heads=1, head_dim=16,
                       block_size=16, dtype=torch.float32, seed=3)
    wide = {k: v.long() if k in ("block_tables", "seq_lens", "query_start_loc") else v
            for k, v in batch.items()}
    torch.testing.assert_close(paged_attention_triton(**wide), dense_attention(**batch),
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,splits,scales", [(1, 1, (1.0, 1.0)), (4, 1, (0.5, 3.0)),
                                                 (5, 3, (2.0, 0.25))])
def test_fp8_cache(dtype: torch.dtype, group: int, splits: int,
                   scales: tuple[float, float]) -> None:
    """fp8 (e4m3) K/V with per-tensor scales under 16-bit queries: prefill chunks, decode rows,
    GQA, split KV. The oracle and the reference read the same e4m3 values in fp32."""
    batch = make_batch(MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=48, block_size=16,
                       dtype=dtype, seed=group, cache_dtype=FP8, scales=scales)
    check(batch, dtype, num_kv_splits=splits)


def test_fp8_cache_on_the_native_dot_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a GPU: e4m3 widened to fp16 and fed to tl.dot (the interpreter's fp16 dot is
    right), the scales folded into the score scale and the output."""
    import kernels.triton_paged_attention as module
    monkeypatch.setattr(module, "_DOT_FP32", False)
    batch = make_batch(MIXED, num_heads=4, num_kv_heads=1, head_dim=32, block_size=16,
                       dtype=torch.float16, seed=8, cache_dtype=FP8, scales=(0.7, 1.3))
    oracle = dense_attention(**batch)
    for splits in (1, 2):
        out = paged_attention_triton(**batch, num_kv_splits=splits)
        torch.testing.assert_close(out, oracle, atol=4e-3, rtol=4e-3)
