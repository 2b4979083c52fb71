"""Triton weight-only linear layers: quantized ``Lanes`` dequantized inside the GEMM.

``pack`` lays a ``kernels.Lanes`` weight ``[n, k]`` out on the device once, at load
(``TritonLanes``): 8-bit lanes one int8 a byte, 4-bit lanes two a byte (byte j of a row holds
inputs 2j in its low and 2j+1 in its high nibble), fp32 scales (and mins) per ``granule``
inputs, the largest power of two dividing the lanes' group (scales repeated for a group of 96,
so the kernel finds a lane's scale with a shift), each row padded to 16 elements. Every format
``kernels/lanes.py`` maps onto lanes (int8 / int4 at load, GGUF Q8_0 ... Q6_K) is one of four
binaries: 8 or 4 bits, with or without mins.

``_linear_kernel`` computes ``x [m, k] @ W.T (+ bias)`` for fp16 / bf16 / fp32 ``x``, with
fp32 accumulation: each program owns a ``BLOCK_M x BLOCK_N`` output tile and walks its inputs
``BLOCK_K`` at a time, loading the lanes' bytes, decoding them in registers (``fma(q, scale,
min)``, one rounding as ``Lanes.dequantize``) and multiplying: for one row (gemv) by a
broadcast product summed over the inputs, for more (decode up to 16 rows, prefill) by
``tl.dot`` on the decoded tile in the activations' dtype (fp32 with ``ieee`` precision, so an
fp32 model computes on exactly the dequantized weights). 4-bit tiles multiply their low and
high nibbles by the even and odd inputs. When the output tiles are too few to fill the device
(decode), the inputs are split across programs that write fp32 partial sums, and
``_reduce_kernel`` adds them in a fixed order (deterministic) with the bias. ``plan_linear``
is the one place that picks tiles and splits; ``kernels/triton_variants.py`` compiles what it
plans. ``rows_of`` is the embedding lookup in a packed table: rows dequantized exactly.
Importing this module imports triton; ``kernels/__init__.py`` only does so when it is used.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lanes import Lanes
from kernels.triton_launch import Launch, check_aligned, device_sms

__all__ = ["TritonLanes", "linear_triton", "pack", "plan_linear", "rows_of", "tile_config"]

# The interpreter's tl.dot is wrong on bf16 inputs; on a GPU the activations' dtype feeds it.
_DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"
_ALIGN = 16             # elements per padded row: the JIT's divisibility specialization is fixed
_MAX_SPLITS = 16
_MIN_SPLIT_TILES = 2    # input tiles per split at the least
_REDUCE_BLOCK = 256


@dataclass
class TritonLanes:
    """Lanes laid out for ``_linear_kernel`` on their device (see the module docstring)."""
    values: torch.Tensor                # int8 [n, k] or uint8 [n, k / 2], rows padded to 16
    scales: torch.Tensor                # fp32 [n, k / granule], rows padded to 16
    mins: torch.Tensor | None           # as scales, or None: all zero
    bits: int
    granule: int                        # inputs per stored scale, a power of two >= 16
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per pass over the weight (padding excluded)."""
        n = self.out_features
        per_row = self.in_features * self.bits // 8 + 4 * (self.in_features // self.granule) * (
            1 if self.mins is None else 2)
        return n * per_row


def pack(lanes: Lanes, device: torch.device | str | None = None) -> TritonLanes:
    """``lanes`` on ``device`` (their own if None) in the kernel's layout."""
    n, k = lanes.shape
    group = lanes.group
    if k % 16 or group % 16:
        raise ValueError(f"the Triton linear kernel needs groups of a multiple of 16 inputs, "
                         f"got {group} for a weight [{n}, {k}]")
    device = lanes.values.device if device is None else torch.device(device)
    granule = group & -group
    values = lanes.values.to(device)
    if lanes.bits == 4:
        u = values.to(torch.uint8)
        values = u[:, 0::2] | (u[:, 1::2] << 4)

    def spread(t: torch.Tensor) -> torch.Tensor:
        return _padded(t.to(device, torch.float32).repeat_interleave(group // granule, dim=1))
    mins = None if lanes.mins is None else spread(lanes.mins)
    return TritonLanes(_padded(values), spread(lanes.scales), mins, lanes.bits, granule, n, k)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """``t [n, c]`` as a view of ``[n, c rounded up to 16]`` storage (zeros past ``c``)."""
    n, c = t.shape
    out = torch.zeros(n, -(-c // _ALIGN) * _ALIGN, dtype=t.dtype, device=t.device)
    out[:, :c] = t
    return out[:, :c]


@triton.jit
def _accumulate(acc, x_rows, row_ok, inputs, input_ok, w, DOT: tl.constexpr,
                DOT_FP32: tl.constexpr):
    """``acc [BLOCK_M, BLOCK_N] += x[:, inputs] @ w.T`` for the decoded tile ``w``."""
    x = tl.load(x_rows + inputs[None, :], mask=row_ok[:, None] & input_ok[None, :], other=0.0)
    if DOT:
        wt = tl.trans(w.to(x.dtype))
        if DOT_FP32:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc += tl.dot(x, wt, input_precision="ieee")
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


# The sizes and the split vary with the model and the batch, not the code: unspecialized, so
# the four formats x three dtypes x three tile kinds are all the binaries there are.
@triton.jit(do_not_specialize=["m", "n", "k", "group_shift", "tiles_per_split", "has_bias",
                               "stride_om"])
def _linear_kernel(x_ptr, values_ptr, scales_ptr, mins_ptr, bias_ptr, out_ptr, part_ptr,
                   m, n, k, group_shift, tiles_per_split, has_bias,
                   stride_xm, stride_vn, stride_sn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BITS: tl.constexpr, HAS_MIN: tl.constexpr, DOT: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    v_rows = values_ptr + cols.to(tl.int64)[:, None] * stride_vn
    s_rows = scales_ptr + cols.to(tl.int64)[:, None] * stride_sn
    m_rows = mins_ptr + cols.to(tl.int64)[:, None] * stride_sn

    PER_BYTE: tl.constexpr = 8 // BITS
    lane = tl.arange(0, BLOCK_K // PER_BYTE)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = split * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k, k_lo + tiles_per_split * BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        inputs = k0 + lane * PER_BYTE           # the first input of each byte
        input_ok = inputs < k_hi
        tile_ok = col_ok[:, None] & input_ok[None, :]
        groups = (inputs >> group_shift)[None, :]
        b = tl.load(v_rows + (k0 // PER_BYTE + lane)[None, :], mask=tile_ok, other=0)
        scale = tl.load(s_rows + groups, mask=tile_ok, other=0.0)
        if HAS_MIN:
            low = tl.load(m_rows + groups, mask=tile_ok, other=0.0)
        else:
            low = tl.zeros_like(scale)
        if BITS == 8:
            w = tl.fma(b.to(tl.float32), scale, low)
            acc = _accumulate(acc, x_rows, row_ok, inputs, input_ok, w, DOT, DOT_FP32)
        else:
            w = tl.fma((b & 15).to(tl.float32), scale, low)
            acc = _accumulate(acc, x_rows, row_ok, inputs, input_ok, w, DOT, DOT_FP32)
            w = tl.fma((b >> 4).to(tl.float32), scale, low)
            acc = _accumulate(acc, x_rows, row_ok, inputs + 1, input_ok, w, DOT, DOT_FP32)

    out_ok = row_ok[:, None] & col_ok[None, :]
    if num_splits == 1:
        if has_bias != 0:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        part = part_ptr + (split * m + rows).to(tl.int64)[:, None] * n + cols[None, :]
        tl.store(part, acc, mask=out_ok)


@triton.jit(do_not_specialize=["m", "n", "num_splits", "has_bias", "stride_om"])
def _reduce_kernel(part_ptr, bias_ptr, out_ptr, m, n, num_splits, has_bias, stride_om,
                   BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    ok = cols < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(0, num_splits):
        acc += tl.load(part_ptr + (split * m + row).to(tl.int64) * n + cols, mask=ok, other=0.0)
    if has_bias != 0:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + cols, acc.to(out_ptr.dtype.element_ty),
             mask=ok)


@dataclass(frozen=True)
class Tiles:
    kind: str           # gemv (one row), decode (up to 16 rows), prefill
    block_m: int
    block_n: int
    block_k: int
    num_warps: int

    @property
    def dot(self) -> bool:
        return self.block_m > 1


def tile_config(m: int, dtype: torch.dtype) -> Tiles:
    """The tile of one program for ``m`` rows of ``dtype``, sized so no variant spills
    registers (docs/kernels.md). One row reads a narrow tile deep in inputs; up to 16 rows
    share the 16-row ``tl.dot``; more rows take a square tile. fp32 has no tensor-core dot
    (``ieee`` runs on the FMA units and holds both operands in registers): smaller tiles."""
    if m == 1:
        return Tiles("gemv", 1, 32, 128, 4)
    if dtype == torch.float32:
        return Tiles("decode", 16, 32, 32, 4) if m <= 16 else Tiles("prefill", 32, 32, 32, 8)
    if m <= 16:
        return Tiles("decode", 16, 64, 64, 4)
    return Tiles("prefill", 64, 64, 64, 8)


def choose_splits(programs: int, k_tiles: int, num_sms: int) -> int:
    """Split the inputs only when the output tiles cannot fill the device (decode)."""
    if programs >= num_sms:
        return 1
    return max(1, min(-(-2 * num_sms // programs), k_tiles // _MIN_SPLIT_TILES, _MAX_SPLITS))


def plan_linear(x: torch.Tensor, packed: TritonLanes, bias: torch.Tensor | None, *,
                num_splits: int | None = None, num_sms: int | None = None
                ) -> tuple[list[Launch], torch.Tensor]:
    """The launches that compute ``linear_triton`` (the linear, then the reduction when the
    inputs are split) and the output ``[m, n]`` they write; ``x`` is ``[m, k]``."""
    m, k = x.shape
    n = packed.out_features
    assert k == packed.in_features, f"x has {k} inputs, the weight {packed.in_features}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert bias is None or (bias.shape == (n,) and bias.dtype == x.dtype), \
        "bias must be [out] in the activations' dtype"
    if x.stride(-1) != 1 or x.stride(0) % _ALIGN or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)      # a fresh, aligned copy
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return [], out
    bias_arg = x if bias is None else bias.contiguous()
    check_aligned(x, packed.values, packed.scales, bias_arg)
    tiles = tile_config(m, x.dtype)
    programs = triton.cdiv(n, tiles.block_n) * triton.cdiv(m, tiles.block_m)
    k_tiles = triton.cdiv(k, tiles.block_k)
    if num_splits is None:
        num_splits = 1 if tiles.kind == "prefill" else choose_splits(
            programs, k_tiles, num_sms or device_sms(x.device))
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(num_splits, k_tiles)))
    num_splits = triton.cdiv(k_tiles, tiles_per_split)
    assert 1 <= num_splits <= _MAX_SPLITS
    part = (torch.empty(num_splits, m, n, dtype=torch.float32, device=x.device)
            if num_splits > 1 else packed.scales)       # unused unless split
    has_bias = int(bias is not None)
    linear = Launch(_linear_kernel, (triton.cdiv(n, tiles.block_n), triton.cdiv(m, tiles.block_m),
                                     num_splits), dict(
        x_ptr=x, values_ptr=packed.values, scales_ptr=packed.scales,
        mins_ptr=packed.scales if packed.mins is None else packed.mins, bias_ptr=bias_arg,
        out_ptr=out, part_ptr=part, m=m, n=n, k=k, group_shift=packed.granule.bit_length() - 1,
        tiles_per_split=tiles_per_split, has_bias=has_bias,
        stride_xm=x.stride(0), stride_vn=packed.values.stride(0),
        stride_sn=packed.scales.stride(0), stride_om=out.stride(0)),
        dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
             BITS=packed.bits, HAS_MIN=packed.mins is not None, DOT=tiles.dot,
             DOT_FP32=_DOT_FP32), {"num_warps": tiles.num_warps})
    if num_splits == 1:
        return [linear], out
    reduce = Launch(_reduce_kernel, (triton.cdiv(n, _REDUCE_BLOCK), m), dict(
        part_ptr=part, bias_ptr=bias_arg, out_ptr=out, m=m, n=n, num_splits=num_splits,
        has_bias=has_bias, stride_om=out.stride(0)), dict(BLOCK=_REDUCE_BLOCK))
    return [linear, reduce], out


def linear_triton(x: torch.Tensor, packed: TritonLanes, bias: torch.Tensor | None, *,
                  num_splits: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x [..., in]`` and ``packed = pack(W)``, in ``x``'s dtype.
    ``num_splits`` overrides the split of the inputs (tests use it to force the path)."""
    rows = x.reshape(-1, x.shape[-1])
    launches, out = plan_linear(rows, packed, bias, num_splits=num_splits)
    for launch in launches:
        launch()
    return out.view(*x.shape[:-1], packed.out_features)


def rows_of(ids: torch.Tensor, packed: TritonLanes) -> torch.Tensor:
    """Rows ``ids`` of the packed weight in fp32, exactly as ``Lanes.dequantize`` gives them:
    the embedding lookup in its own format (a gather of a few rows, then one rounding)."""
    flat = ids.reshape(-1).long()
    k = packed.in_features
    b = packed.values[flat]
    if packed.bits == 4:
        b = torch.stack((b & 15, b >> 4), dim=-1).flatten(1)

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t[flat].double().repeat_interleave(packed.granule, dim=1)
    w = b[:, :k].double() * expand(packed.scales)
    if packed.mins is not None:
        w += expand(packed.mins)
    return w.float().view(*ids.shape, k)
