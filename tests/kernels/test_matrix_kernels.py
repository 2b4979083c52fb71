"""The compiled matrix kernels (kernels/cpu/matrix.cpp) on every packed weight format: q8
and q4 lanes (with and without mins, groups 16/32/128) against a float64 oracle built from
the kernel's own activation quantization (``quantize_rows``), and against fp32 ``x @ W.T``
within the bound that quantization allows; bf16 and fp16 against float64; every row count
class of the tiles; the embedding lookup exact in every format; one and two threads alike;
malformed packed weights refused with a message."""
import pytest
import torch
from gguf_files import random_blocks

import kernels
from kernels import Lanes, cpu_build

pytestmark = pytest.mark.skipif(not cpu_build.load(), reason="no C++ compiler for the CPU kernels")

ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 61, 64, 65, 130]
EPS = 2.0 ** -24


def _pack(weight):
    from kernels.cpu_linear import pack
    return pack(weight, kernels.HugePageArena())


def _linear(x, packed, bias):
    from kernels.cpu_linear import linear_packed_cpu
    return linear_packed_cpu(x, packed, bias)


def _lanes(n: int, k: int, bits: int, group: int, mins: bool, seed: int) -> Lanes:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if bits == 4 else (-128, 128)
    values = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    m = (torch.rand(n, k // group, generator=gen) - 0.5) * 0.2 if mins else None
    return Lanes(values, scales, m, bits)


def _exact(lanes: Lanes) -> torch.Tensor:
    """The weight in float64 as the kernel combines it (scale and min unrounded)."""
    g = lanes.group
    w = lanes.values.double() * lanes.scales.double().repeat_interleave(g, dim=1)
    if lanes.mins is not None:
        w += lanes.mins.double().repeat_interleave(g, dim=1)
    return w


def _dequantized_x(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as the q8/q4 kernels see it, float64; its per-element step) from quantize_rows."""
    q, r, scale = torch.ops.tsllm_cpu.quantize_rows(x, block)
    step = scale.double().repeat_interleave(block, dim=1)
    return (254 * q.double() + r.double()) * step, step


def _check_lanes(x: torch.Tensor, lanes: Lanes, packed, bias: torch.Tensor | None) -> None:
    got = _linear(x, packed, bias).double()
    w = _exact(lanes)
    xd, step = _dequantized_x(x, min(lanes.group, 32))
    b = 0.0 if bias is None else bias.double()
    want = xd @ w.T + b
    # fp32 sums of a few products per block: far under 1e-5 of the magnitudes summed
    size = xd.abs() @ w.abs().T + (0.0 if bias is None else bias.double().abs())
    assert bool(((got - want).abs() <= 1e-5 * size + 1e-30).all()), \
        float(((got - want).abs() / size.clamp_min(1e-30)).max())
    # against fp32 activations: off by at most each activation's half step (and rounding)
    x64 = x.double()
    slack = (0.5 * step + 4 * EPS * x64.abs()) @ w.abs().T + 1e-5 * size
    assert bool(((got - (x64 @ w.T + b)).abs() <= slack).all())
    assert float(((got - (x64 @ w.T + b)).abs() / size.clamp_min(1e-30)).max()) < 1e-4


FORMATS = [(8, 16, False), (8, 32, False), (8, 128, False), (8, 32, True), (8, 16, True),
           (4, 32, True), (4, 128, True), (4, 16, True), (4, 32, False)]


@pytest.mark.parametrize("bits,group,mins", FORMATS)
def test_lanes_linear_every_tile_class(bits: int, group: int, mins: bool) -> None:
    n, k = 37, 256
    lanes = _lanes(n, k, bits, group, mins, seed=bits * group + mins)
    packed = _pack(lanes)
    gen = torch.Generator().manual_seed(group)
    bias = torch.randn(n, generator=gen)
    for m in ROWS:
        x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 3
        _check_lanes(x, lanes, packed, bias if m % 2 else None)


def test_lanes_linear_every_batch_size() -> None:
    lanes = _lanes(20, 64, 8, 32, True, seed=11)
    packed = _pack(lanes)
    gen = torch.Generator().manual_seed(12)
    before = torch.get_num_threads()
    torch.set_num_threads(1)    # 256 tiny calls: no thread hand-offs on a busy machine
    try:
        for m in range(1, 257):
            _check_lanes(torch.randn(m, 64, generator=gen), lanes, packed, None)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q6_K"])
def test_gguf_lanes_linear(type_name: str) -> None:
    lanes = kernels.from_gguf(type_name, random_blocks(type_name, 21, 256, seed=13), (21, 256))
    packed = _pack(lanes)
    gen = torch.Generator().manual_seed(14)
    for m in (1, 3, 8, 65):
        _check_lanes(torch.randn(m, 256, generator=gen), lanes, packed, None)


def test_zero_rows_and_zero_blocks() -> None:
    lanes = _lanes(20, 64, 8, 32, True, seed=15)
    packed = _pack(lanes)
    x = torch.randn(3, 64)
    x[1] = 0.0
    x[2, :32] = 0.0
    _check_lanes(x, lanes, packed, None)
    assert bool((_linear(x, packed, None)[1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_linear_every_tile_class(dtype: torch.dtype) -> None:
    n, k = 45, 100
    gen = torch.Generator().manual_seed(16)
    w = torch.randn(n, k, generator=gen).to(dtype)
    packed = _pack(w)
    bias = torch.randn(n, generator=gen)
    w64 = w.double()
    for m in ROWS:
        x = torch.randn(m, k, generator=gen)
        b = bias if m % 2 else None
        got = _linear(x, packed, b).double()
        want = x.double() @ w64.T + (0.0 if b is None else b.double())
        size = x.double().abs() @ w64.abs().T + (0.0 if b is None else b.double().abs())
        assert bool(((got - want).abs() <= 1e-5 * size).all()), m


def test_three_dimensional_input() -> None:
    lanes = _lanes(33, 64, 4, 32, True, seed=17)
    packed = _pack(lanes)
    x = torch.randn(2, 5, 64)
    got = _linear(x, packed, None)
    assert got.shape == (2, 5, 33)
    torch.testing.assert_close(got.reshape(10, 33), _linear(x.reshape(10, 64), packed, None),
                               rtol=0, atol=0)


@pytest.mark.parametrize("block", [16, 32])
def test_quantize_rows_within_half_a_step(block: int) -> None:
    gen = torch.Generator().manual_seed(block)
    x = torch.randn(9, 128, generator=gen) * torch.logspace(-6, 3, 9)[:, None]
    x[4, :block] = 0.0                                  # an all-zero block
    x[5, 3] = 1e30                                      # a huge value next to small ones
    q, r, scale = torch.ops.tsllm_cpu.quantize_rows(x, block)
    assert q.shape == r.shape == x.shape and scale.shape == (9, 128 // block)
    assert q.dtype == r.dtype == torch.int8 and scale.dtype == torch.float32
    for t in (q, r):
        assert -127 <= int(t.min()) and int(t.max()) <= 127
    xd, step = _dequantized_x(x, block)
    err = (x.double() - xd).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-3) + 4 * EPS * x.double().abs()).all())
    top = x.abs().reshape(9, -1, block).amax(-1).double()
    torch.testing.assert_close(scale.double(), top / (127 * 254), rtol=1e-6, atol=0)
    assert bool((q[4, :block] == 0).all() and (r[4, :block] == 0).all())
    assert float(scale[4, 0]) == 0.0
    with pytest.raises(RuntimeError, match="multiple of block"):
        torch.ops.tsllm_cpu.quantize_rows(x, 48)


def _embedding(ids, packed):
    from kernels.cpu_linear import embedding_packed_cpu
    return embedding_packed_cpu(ids, packed)


@pytest.mark.parametrize("bits,group,mins", FORMATS)
def test_embedding_rows_exact(bits: int, group: int, mins: bool) -> None:
    lanes = _lanes(40, 128, bits, group, mins, seed=18 + group)
    ids = torch.tensor([[0, 39, 17], [16, 15, 39]])
    got = _embedding(ids, _pack(lanes))
    assert got.shape == (2, 3, 128) and got.dtype == torch.float32
    assert torch.equal(got, lanes.dequantize()[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_rows_exact_dense(dtype: torch.dtype) -> None:
    w = torch.randn(35, 48).to(dtype)
    ids = torch.tensor([34, 0, 16, 16])
    assert torch.equal(_embedding(ids, _pack(w)), w.float()[ids])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        _embedding(torch.tensor([35]), _pack(w))


def test_threads_agree() -> None:
    before = torch.get_num_threads()
    cases = [(_lanes(100, 256, 8, 32, True, seed=19), torch.randn(70, 256)),
             (_lanes(100, 256, 4, 128, True, seed=20), torch.randn(5, 256)),
             (torch.randn(100, 96).to(torch.bfloat16), torch.randn(9, 96))]
    try:
        for weight, x in cases:
            packed = _pack(weight)
            torch.set_num_threads(1)
            one = _linear(x, packed, None)
            torch.set_num_threads(2)
            two = _linear(x, packed, None)
            assert torch.equal(one, two)
    finally:
        torch.set_num_threads(before)


def test_malformed_packed_weights_are_refused() -> None:
    op = torch.ops.tsllm_cpu.matrix_linear
    packed = _pack(_lanes(20, 64, 8, 32, True, seed=21))
    values, scales, mins = packed.tensors
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="packed values"):
        op(x, values, scales, mins, 40, None)                       # n needs 3 panels
    with pytest.raises(RuntimeError, match="scales come with"):
        op(x, values, None, None, 20, None)                         # q8 without scales
    with pytest.raises(RuntimeError, match="scales and mins"):
        op(x, values, scales, mins[:, :1].contiguous(), 20, None)   # mins of another shape
    with pytest.raises(RuntimeError, match="x contiguous fp32"):
        op(torch.randn(2, 32), values, scales, mins, 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, values, scales, mins, 20, torch.randn(19))
    with pytest.raises(RuntimeError, match="no weight format"):
        op(x, values.int(), scales, mins, 20, None)
    wide = _pack(_lanes(20, 96, 8, 48, False, seed=22))
    with pytest.raises(RuntimeError, match="group of 48"):
        op(torch.randn(2, 96), *wide.tensors, 20, None)
    dense = _pack(torch.randn(20, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="scales come with"):
        op(x, dense.values, scales, None, 20, None)
