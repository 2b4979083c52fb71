"""Triton weight-only linear layers (kernels/triton_linear.py), on CPU under the interpreter
(on CUDA with TRITON_INTERPRET=0, as scripts/gpu_check.sh runs them):
every format of lanes against ``Lanes.dequantize`` + a float64 matmul, on odd shapes, in each
row class (gemv, decode, prefill), split across inputs or not, with and without bias, fp16 /
bf16 / fp32 activations; the embedding lookup exact; the dispatch choosing it. The engine on
this path: tests/engine/test_triton_path.py."""
import gguf
import pytest
import torch
from gguf_files import random_blocks
from paged_batch import DEVICE

import kernels
from kernels import Lanes
from kernels.triton_linear import TritonLanes, linear_triton, pack, plan_linear, rows_of

ROWS = (1, 3, 16, 33, 200)          # gemv, decode (twice: partial and full), prefill
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Per element of x @ W.T, |error| <= EPS * sum_i |x_i w_i| + EPS * |y|: under tl.dot the
# weight is rounded to the activations' dtype (relative 2^-9 for bf16, 2^-12 for fp16) and the
# output is rounded once more; fp32 sums in another order than float64 (K * 2^-24 ~ 4e-5 at
# worst for K = 640, ~1e-6 for random signs).
EPS = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -8}


def _quantized(bits: int, group: int, k: int) -> Lanes:
    torch.manual_seed(bits * 1000 + group)
    return kernels.quantize(torch.randn(37, k) * 0.1, bits, group)


def _gguf(type_name: str) -> Lanes:
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    n, k = 37, 2 * block if block == 256 else 224
    return kernels.from_gguf(type_name, random_blocks(type_name, n, k, seed=n + k), (n, k))


# (name, lanes): every kind of lanes (8 / 4 bits, with and without mins, groups of 16 to 256)
FORMATS = {
    "int8-g16": lambda: _quantized(8, 16, 224), "int8-g32": lambda: _quantized(8, 32, 224),
    "int8-g128": lambda: _quantized(8, 128, 640), "int4-g16": lambda: _quantized(4, 16, 224),
    "int4-g32": lambda: _quantized(4, 32, 224), "int4-g96": lambda: _quantized(4, 96, 288),
    "int4-g128": lambda: _quantized(4, 128, 640),
    "Q8_0": lambda: _gguf("Q8_0"), "Q4_1": lambda: _gguf("Q4_1"), "Q4_K": lambda: _gguf("Q4_K"),
    "Q5_K": lambda: _gguf("Q5_K"), "Q6_K": lambda: _gguf("Q6_K"),
}


def check(x: torch.Tensor, lanes: Lanes, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    w = lanes.dequantize().double()
    xd, y = x.cpu().double(), y.cpu()
    want = xd @ w.T + (0 if bias is None else bias.cpu().double())
    bound = EPS[x.dtype] * ((xd.abs() @ w.abs().T) + want.abs()) + 1e-30
    assert y.dtype == x.dtype and y.shape == want.shape
    err = (y.double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_matches_the_reference(name: str) -> None:
    lanes = FORMATS[name]()
    packed = pack(lanes, DEVICE)
    n, k = lanes.shape
    assert packed.bits == lanes.bits and (packed.mins is None) == (lanes.mins is None)
    torch.manual_seed(len(name))
    for i, (m, dtype) in enumerate((m, d) for m in ROWS for d in DTYPES):
        x = torch.randn(m, k).to(DEVICE, dtype)
        bias = torch.randn(n).to(DEVICE, dtype) if i % 2 else None
        check(x, lanes, bias, linear_triton(x, packed, bias))


@pytest.mark.parametrize("m", [1, 3, 16])
def test_split_inputs_sum_in_a_fixed_order(m: int) -> None:
    """Decode rows split across 3 input ranges (the reduction adds the bias) agree with the
    reference and repeat bit for bit."""
    lanes = _quantized(4, 32, 640)
    packed = pack(lanes, DEVICE)
    x = torch.randn(m, 640, device=DEVICE)
    bias = torch.randn(37, device=DEVICE)
    launches, _ = plan_linear(x, packed, bias, num_splits=3)
    assert len(launches) == 2 and launches[0].grid[2] == 3
    y = linear_triton(x, packed, bias, num_splits=3)
    check(x, lanes, bias, y)
    assert torch.equal(y, linear_triton(x, packed, bias, num_splits=3))


def test_plans_split_only_small_decode_grids() -> None:
    packed = pack(_quantized(8, 32, 640), DEVICE)
    kinds = {}
    for m in ROWS:
        x = torch.empty(m, 640, device=DEVICE)
        launches, _ = plan_linear(x, packed, None, num_sms=132)
        kinds[m] = (launches[0].constexprs["BLOCK_M"], len(launches))
    # 37 outputs fill 2 programs at most: decode splits its inputs, prefill never does
    assert kinds == {1: (1, 2), 3: (16, 2), 16: (16, 2), 33: (32, 1), 200: (32, 1)}
    assert plan_linear(torch.empty(0, 640, device=DEVICE), packed, None)[0] == []


def test_leading_dims_strided_and_unaligned_rows() -> None:
    lanes = _quantized(8, 32, 224)
    packed = pack(lanes, DEVICE)
    base = torch.randn(2, 3, 2 * 224, device=DEVICE)
    x = base[..., :224]             # rows 448 apart: a view the planner must read right
    y = linear_triton(x, packed, None)
    assert y.shape == (2, 3, 37)
    check(x.reshape(-1, 224), lanes, None, y.reshape(-1, 37))
    x = base.reshape(-1)[1:1 + 4 * 224].view(4, 224)     # 4 bytes past an aligned start
    check(x, lanes, None, linear_triton(x, packed, None))


@pytest.mark.parametrize("name", ["int4-g96", "int8-g16", "Q4_K", "Q6_K", "Q8_0"])
def test_embedding_rows_are_exact(name: str) -> None:
    lanes = FORMATS[name]()
    ids = torch.tensor([[0, 36], [5, 5]])
    rows = rows_of(ids.to(DEVICE), pack(lanes, DEVICE)).cpu()
    assert rows.dtype == torch.float32 and torch.equal(rows, lanes.dequantize()[ids])


def test_refuses_groups_it_cannot_lay_out() -> None:
    lanes = Lanes(torch.zeros(4, 24, dtype=torch.int8), torch.ones(4, 3), None, 8)  # group 8
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(lanes)


@pytest.fixture
def backend():
    before = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(before)


def test_dispatch_packs_lanes_for_triton_and_leaves_dense_weights(backend) -> None:
    backend("triton")
    lanes = _quantized(4, 32, 224)
    packed = kernels.pack_linear(lanes.to(DEVICE))
    assert isinstance(packed, TritonLanes)
    assert kernels.pack_linear(torch.randn(37, 224, device=DEVICE)) is None   # dense: F.linear
    x = torch.randn(3, 224, device=DEVICE)
    bias = torch.randn(37, device=DEVICE)
    check(x, lanes, bias, kernels.linear_packed(x, packed, bias))
    ids = torch.tensor([1, 2])
    assert torch.equal(kernels.embedding_packed(ids.to(DEVICE), packed).cpu(),
                       lanes.dequantize()[ids])
    backend("reference")
    assert kernels.pack_linear(lanes.to(DEVICE)) is None     # the model dequantizes
