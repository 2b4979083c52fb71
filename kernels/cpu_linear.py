"""Linear layers on CPU through the compiled kernels of ``cpu/linear.cpp`` (fp32),
``cpu/matrix.cpp`` (bf16, fp16) and ``cpu/int_matrix.cpp`` (quantized lanes), any row count.

A weight ``[out, in]`` is packed once, at load, into panels of 16 outputs stored input-major
(``pack``, into huge pages): fp32, bf16 and fp16 as they are; quantized ``Lanes`` in chunks
of inputs laid out for integer dot products (``_pack_lanes``), with fp32 scales and mins
``[panels, in / group, 16]``. The kernels read the panels
sequentially with every load feeding FMAs for several rows at a time. fp32, measured on
SmolLM2's matrices (one thread, this project's AMD EPYC; docs/benchmarks.md): 1 row ~19 GB/s
from huge pages, 8 rows 0.45x MKL's time, 64 rows 0.8x, 512 rows 0.93x.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.huge_pages import HugePageArena
from kernels.lanes import Lanes

__all__ = ["PANEL", "PackedWeight", "embedding_packed_cpu", "linear_packed_cpu", "pack"]

PANEL = 16      # outputs per panel, as kPanel in cpu/ops.h
DENSE = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PackedWeight:
    """A weight packed for the compiled kernels (``cpu/ops.h``, ``Matrix``)."""
    values: torch.Tensor                # [panels, in, 16] (4-bit: [panels, in / 2, 16] uint8)
    scales: torch.Tensor | None         # fp32 [panels, in / group, 16] for quantized lanes
    mins: torch.Tensor | None
    out_features: int
    in_features: int

    @property
    def tensors(self) -> list[torch.Tensor | None]:
        return [self.values, self.scales, self.mins]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)


def pack(weight: torch.Tensor | Lanes, arena: HugePageArena) -> PackedWeight:
    """``weight [n, k]`` (dense fp32 / bf16 / fp16, or quantized lanes) in panels in
    ``arena``: panel p holds outputs 16p..16p+15 (zeros past n), input-major."""
    if isinstance(weight, Lanes):
        return _pack_lanes(weight, arena)
    if weight.dtype not in DENSE:
        raise ValueError(f"no packed format for dense {weight.dtype} weights")
    n, k = weight.shape
    return PackedWeight(_panels(weight.detach(), weight.dtype, arena), None, None, n, k)


def _panels(t: torch.Tensor, dtype: torch.dtype, arena: HugePageArena) -> torch.Tensor:
    """``t [n, c]`` as ``[ceil(n / 16), c, 16]`` of ``dtype`` in ``arena``."""
    n, c = t.shape
    panels = -(-n // PANEL)
    out = arena.zeros((panels, c, PANEL), dtype)
    out.copy_(F.pad(t, (0, 0, 0, panels * PANEL - n)).view(panels, PANEL, c).transpose(1, 2))
    return out


def _pack_lanes(lanes: Lanes, arena: HugePageArena) -> PackedWeight:
    """Chunks of 4 inputs (8 bits) or 8 inputs (4 bits) per panel, output-major inside a
    chunk: ``[panels, k / chunk, 16 outputs x 4 bytes]`` (``cpu/matrix.cpp``)."""
    n, k = lanes.shape
    chunk = 8 if lanes.bits == 4 else 4
    if k % 32:
        raise ValueError(f"quantized weights need a multiple of 32 inputs, got {k}")
    panels = -(-n // PANEL)
    v = F.pad(lanes.values, (0, 0, 0, panels * PANEL - n)).view(panels, PANEL, k // chunk, chunk)
    if lanes.bits == 4:
        u = v.to(torch.uint8)
        v = u[..., :4] | (u[..., 4:] << 4)
    v = v.permute(0, 2, 1, 3).reshape(panels, k // chunk, 4 * PANEL)
    packed = arena.zeros(tuple(v.shape), v.dtype)
    packed.copy_(v)
    scales = _panels(lanes.scales, torch.float32, arena)
    mins = None if lanes.mins is None else _panels(lanes.mins, torch.float32, arena)
    return PackedWeight(packed, scales, mins, n, k)


def linear_packed_cpu(x: torch.Tensor, packed: PackedWeight,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x [..., in]`` and ``packed = pack(W)``."""
    n = packed.out_features
    if x.dim() == 2 and x.is_contiguous():      # the model's case: no reshaping ops
        return torch.ops.tsllm_cpu.matrix_linear(x, *packed.tensors, n, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.tsllm_cpu.matrix_linear(rows, *packed.tensors, n, bias)
    return y.view(*x.shape[:-1], n)


def embedding_packed_cpu(ids: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Rows ``ids`` of the packed weight, in fp32: an embedding lookup in its own format."""
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    rows = torch.ops.tsllm_cpu.matrix_rows_of(flat, *packed.tensors, packed.out_features)
    return rows.view(*ids.shape, packed.in_features)
