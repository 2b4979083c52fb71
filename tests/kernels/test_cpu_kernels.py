"""The compiled CPU kernels against the PyTorch reference and a dense oracle: paged decode
attention (mixed with prefill chunks, GQA groups, head sizes off the vector width, fp16/bf16,
fp32 queries over fp16/bf16 caches, blocks in random places), the KV store (skipped slots,
int32 and int64 slots, rounding to fp16/bf16 caches bit for bit; fp8 left to the reference) and the packed
linear layer (every row count of the micro-kernel's tiles, one row over groups of four panels
and the panels left over, partial panels, bias), the logits scans (argmax with ties, NaN and
infinities; finiteness); plus the build cache and the fallback when no compiler is found."""
import logging

import pytest
import torch
import torch.nn.functional as F
from paged_batch import dense_attention, make_batch

import kernels
from kernels import cpu_build
from kernels.reference import paged_attention_reference, store_kv_reference

pytestmark = pytest.mark.skipif(not cpu_build.load(), reason="no C++ compiler for the CPU kernels")


def _pack(weight: torch.Tensor):
    from kernels.cpu_linear import pack
    return pack(weight, kernels.HugePageArena())


def _cpu():
    from kernels.cpu_attention import paged_attention_cpu, store_kv_cpu
    from kernels.cpu_linear import linear_packed_cpu
    return paged_attention_cpu, store_kv_cpu, linear_packed_cpu


@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [
    (9, 3, 64, 16),      # SmolLM2
    (4, 4, 128, 8),      # no GQA, two register chunks of the head
    (8, 2, 80, 32),      # head not a multiple of 64: vector chunk + tail
    (6, 2, 36, 16),      # head not a multiple of 8: scalar path
])
def test_decode_matches_reference_and_oracle(heads: int, kv_heads: int, dim: int,
                                             block_size: int) -> None:
    pairs = [(1, n) for n in (1, 7, block_size, block_size + 1, 3 * block_size - 1, 200)]
    batch = make_batch(pairs, heads, kv_heads, dim, block_size, torch.float32, seed=dim)
    got = _cpu()[0](**batch)
    torch.testing.assert_close(got, paged_attention_reference(**batch), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, dense_attention(**batch), atol=2e-6, rtol=1e-5)


def test_mixed_prefill_and_decode_rows() -> None:
    # decode rows around prefill chunks (with and without a cached prefix) and an empty query
    pairs = [(1, 40), (5, 5), (1, 1), (16, 50), (0, 10), (1, 33), (3, 20)]
    batch = make_batch(pairs, 9, 3, 64, 16, torch.float32, seed=1)
    got = _cpu()[0](**batch)
    rows = batch["query_start_loc"][-1]
    torch.testing.assert_close(got[:rows], dense_attention(**batch)[:rows], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches(dtype: torch.dtype) -> None:
    batch = make_batch([(1, 90), (1, 17), (2, 30)], 8, 2, 64, 16, dtype, seed=2)
    got = _cpu()[0](**batch)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), dense_attention(**batch).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("cache", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(9, 3, 64, 16), (8, 2, 80, 32),
                                                           (6, 2, 36, 16), (5, 5, 128, 8)])
def test_fp32_queries_over_16_bit_caches(cache: torch.dtype, heads: int, kv_heads: int,
                                         dim: int, block_size: int) -> None:
    """The compiled decoder's case: fp32 queries, K/V read from a 16-bit cache as fp32;
    decode rows beside prefill chunks (with and without a cached prefix), odd lengths, GQA."""
    pairs = [(1, 1), (1, block_size + 1), (7, 7), (1, 3 * block_size - 1), (5, 40), (1, 200)]
    batch = make_batch(pairs, heads, kv_heads, dim, block_size, torch.float32, seed=dim,
                       cache_dtype=cache)
    got = _cpu()[0](**batch)
    assert got.dtype == torch.float32
    # the same values in fp32 on both sides: only the summation order differs
    torch.testing.assert_close(got, paged_attention_reference(**batch), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, dense_attention(**batch), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cache", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row", [(3, 64), (2, 37), (1, 8)])
def test_store_rounds_to_the_cache_dtype_as_torch(cache: torch.dtype, source: torch.dtype,
                                                  row: tuple[int, int]) -> None:
    """Rows rounded to nearest even, bit for bit as the reference's ``.to()``, through the
    vector path and its tail: halfway cases, values past the 16-bit range, infinities,
    subnormals; NaN stays NaN."""
    gen = torch.Generator().manual_seed(row[1])
    key = (torch.randn(9, *row, generator=gen) * 100).to(source)
    value = torch.randn(9, *row, generator=gen).to(source)
    flat = key.view(-1)
    specials = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 70000.0, -1e39, float("inf"),
                1e-40, -3e-8, float("nan"), 65519.0]
    flat[:len(specials)] = torch.tensor(specials).to(source)
    slots = torch.tensor([5, -1, 17, 0, 63, 2, 9, -1, 33], dtype=torch.int32)
    ours = [torch.zeros(4, 16, *row, dtype=cache) for _ in range(2)]
    ref = [t.clone() for t in ours]
    _cpu()[1](key, value, *ours, slots)
    store_kv_reference(key, value, *ref, slots)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=0, rtol=0, equal_nan=True)
        assert o.isnan().sum() == r.isnan().sum()


def test_fp8_caches_take_the_reference() -> None:
    """The compiled kernels have no e4m3 path (the engine refuses fp8 on CPU); called with an
    fp8 cache the CPU entry points give the reference's answer."""
    from kernels.reference import FP8
    batch = make_batch([(1, 40), (3, 20)], 4, 2, 32, 16, torch.float32, seed=4,
                       cache_dtype=FP8, scales=(0.5, 2.0))
    torch.testing.assert_close(_cpu()[0](**batch), paged_attention_reference(**batch))
    key = torch.randn(3, 2, 32)
    ours = [torch.zeros(2, 16, 2, 32, dtype=FP8) for _ in range(4)]
    _cpu()[1](key, key, ours[0], ours[1], torch.tensor([4, -1, 9]), 0.5, 2.0)
    store_kv_reference(key, key, ours[2], ours[3], torch.tensor([4, -1, 9]), 0.5, 2.0)
    assert torch.equal(ours[0].view(torch.uint8), ours[2].view(torch.uint8))
    assert torch.equal(ours[1].view(torch.uint8), ours[3].view(torch.uint8))


def test_large_scores_stay_finite() -> None:
    # softmax over scores in the hundreds: the online max must keep every exp in range
    batch = make_batch([(1, 70), (1, 3)], 4, 2, 64, 16, torch.float32, seed=3)
    batch["query"] = batch["query"] * 40
    got = _cpu()[0](**batch)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, dense_attention(**batch), atol=1e-4, rtol=1e-4)


def test_store_kv_matches_reference_and_skips_minus_one() -> None:
    _, store_kv_cpu, _ = _cpu()
    key, value = torch.randn(6, 3, 64), torch.randn(6, 3, 64)
    slots = torch.tensor([5, -1, 17, 0, -1, 63])
    ours = [torch.full((4, 16, 3, 64), 7.0) for _ in range(2)]
    ref = [t.clone() for t in ours]
    store_kv_cpu(key, value, *ours, slots)
    store_kv_reference(key, value, *ref, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert (ours[0].view(-1, 3, 64)[[1, 2, 3, 4]] == 7.0).all()     # untouched slots


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 17, 60, 61, 64, 130])
@pytest.mark.parametrize("n,k,bias", [(96, 576, False), (30, 37, True), (1, 8, True),
                                      (49, 1, False)])
def test_linear_matches_torch(rows: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows * n + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    torch.testing.assert_close(_cpu()[2](x, _pack(w), b), F.linear(x, w, b), atol=1e-4,
                               rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [64, 80, 144, 200])
def test_one_row_over_groups_of_four_panels(threads: int, n: int) -> None:
    # a thread's panels in groups of four streams, the rest (and a partial panel) one by one
    gen = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(1, 40, generator=gen), torch.randn(n, 40, generator=gen), torch.randn(n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _cpu()[2](x, _pack(w), b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_linear_packed_keeps_leading_dims_and_refuses_a_mismatched_pack() -> None:
    x, w = torch.randn(2, 3, 40), torch.randn(20, 40)
    torch.testing.assert_close(_cpu()[2](x, _pack(w), None), F.linear(x, w), atol=1e-4,
                               rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"matrix_linear: x contiguous fp32 \[m, 40\]"):
        _cpu()[2](torch.randn(2, 41), _pack(w), None)


def test_store_accepts_int32_slots() -> None:
    key, value = torch.randn(3, 3, 64), torch.randn(3, 3, 64)
    caches = [torch.zeros(4, 16, 3, 64) for _ in range(4)]
    slots = torch.tensor([5, -1, 40])
    _cpu()[1](key, value, caches[0], caches[1], slots.int())
    _cpu()[1](key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0].view(-1, 3, 64)[40], key[2])


def test_auto_on_cpu_dispatches_to_the_compiled_kernels(monkeypatch) -> None:
    before = kernels.get_backend()
    calls: list[str] = []

    def spy(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    try:
        kernels.set_backend("auto")
        assert kernels._use_cpu(torch.empty(1))
        attend, linear, store = kernels._cpu_fns
        monkeypatch.setattr(kernels, "_cpu_fns", (spy("attention", attend), spy("linear", linear),
                                                  spy("store", store)))
        for backend, expected in (("auto", ["attention", "store", "linear"]), ("reference", [])):
            kernels.set_backend(backend)
            calls.clear()
            batch = make_batch([(1, 20), (2, 4)], 2, 1, 16, 16, torch.float32)
            out = kernels.paged_attention(**batch)
            kernels.store_kv(torch.ones(1, 1, 16), torch.ones(1, 1, 16), batch["k_cache"],
                             batch["v_cache"], torch.tensor([3]))
            packed = kernels.pack_linear(torch.randn(4, 8))
            if packed is not None:
                kernels.linear_packed(torch.randn(2, 8), packed, None)
            assert calls == expected
            torch.testing.assert_close(out, dense_attention(**make_batch(
                [(1, 20), (2, 4)], 2, 1, 16, 16, torch.float32)), atol=2e-6, rtol=1e-5)
    finally:
        kernels.set_backend(before)


def test_build_is_cached_and_failure_falls_back(monkeypatch, tmp_path, caplog) -> None:
    assert (cpu_build.cache_dir() / "tsllm_cpu.so").exists()
    monkeypatch.setenv("TORCHSERVE_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="kernels"):
        assert cpu_build._build() is False
    assert any("using the PyTorch reference" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_rms_norm_matches_the_decoder_formula(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=gen) * 3, torch.randn(576, generator=gen)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(torch.ops.tsllm_cpu.rms_norm(x, w, 1e-5), expected, atol=1e-6, rtol=1e-6)


def test_rms_norm_adds_into_the_residual_first() -> None:
    gen = torch.Generator().manual_seed(3)
    x, res, w = (torch.randn(3, 576, generator=gen), torch.randn(3, 576, generator=gen),
                 torch.randn(576, generator=gen))
    total = res + x
    expected = w * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5))
    got = torch.ops.tsllm_cpu.rms_norm(x, w, 1e-5, res)
    assert torch.equal(res, total)      # the residual stream now holds the sum, bit for bit
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("width", [1536, 13])       # vector body, and a scalar tail only
def test_silu_mul_matches_torch(width: int) -> None:
    gate_up = torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(width)) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])      # exp's clamps
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.tsllm_cpu.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6,
                               rtol=1e-6)


def test_rotary_is_bit_identical_to_rotate_half() -> None:
    from engine.models.rope import RotaryEmbedding, _rotate
    rope = RotaryEmbedding(64, 512, 10000.0, None)
    positions = torch.tensor([0, 5, 511, 77])
    qkv = torch.randn(4, (9 + 2 * 3) * 64)             # q and k as views of a fused buffer
    q, k = qkv[:, :576].view(4, 9, 64), qkv[:, 576:768].view(4, 3, 64)
    cos, sin = rope.table(positions)
    got_q, got_k = torch.ops.tsllm_cpu.rotary(q, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert torch.equal(got_q, _rotate(q, cos, sin)) and torch.equal(got_k, _rotate(k, cos, sin))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 49152])
@pytest.mark.parametrize("threads", [1, 2])
def test_argmax_rows_matches_torch_with_ties_nan_and_infinities(n: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(12, n, generator=gen)
    x[1] = float("-inf")                        # every value -inf: index 0
    x[2] = 0.5                                  # all tied: the first
    x[3, n // 2:] = x[3].max() + 1              # a tie from the middle on: its first index
    x[4, -1] = float("inf")
    x[5, n // 3] = float("nan")                 # NaN counts as the maximum
    x[6, 0], x[6, -1] = float("nan"), float("nan")
    x[7, -1] = x[7].max() + 1                   # in the scalar tail
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.tsllm_cpu.argmax_rows(x)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1))
    assert torch.equal(kernels.argmax_rows(x.T.contiguous().T), x.argmax(dim=-1))  # strided in
    assert torch.equal(kernels.argmax_rows(x.double()), x.double().argmax(dim=-1))  # torch's


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 49152])
def test_finite_rows_flags_nan_and_infinities_anywhere(n: int) -> None:
    x = torch.randn(8, n)
    x[1, 0] = float("nan")
    x[2, -1] = float("inf")
    x[3, n // 2] = float("-inf")
    x[4] = torch.finfo(torch.float32).max       # large but finite
    x[5, -1] = float("nan")                     # in the scalar tail
    want = torch.isfinite(x).all(dim=-1)
    assert torch.equal(torch.ops.tsllm_cpu.finite_rows(x), want)
    assert want.tolist() == [True, False, False, False, True, False, True, True]
    assert torch.equal(kernels.finite_rows(x.half()), torch.isfinite(x.half()).all(dim=-1))
