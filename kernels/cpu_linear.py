"""fp32 linear layers on CPU through the compiled kernel of ``cpu/linear.cpp``, any row count.

The weight ``[out, in]`` is packed once, at load, into panels of 16 outputs stored input-major
(``pack``, into huge pages); the kernel then reads it sequentially with every load feeding
FMAs for up to six rows at a time, and with one row four panels at once (four streams).
Measured on SmolLM2's matrices (one thread, this project's AMD EPYC; docs/benchmarks.md):
1 row ~19 GB/s from huge pages (as fast as this machine reads), 8 rows 0.45x MKL's time,
64 rows 0.8x, 512 rows 0.93x, so prefill chunks use it too.
"""
import torch
import torch.nn.functional as F

from kernels.huge_pages import HugePageArena

__all__ = ["PANEL", "linear_packed_cpu", "pack"]

PANEL = 16      # outputs per panel, as kPanel in cpu/ops.h


def pack(weight: torch.Tensor, arena: HugePageArena) -> torch.Tensor:
    """``weight [n, k]`` as ``[ceil(n / 16), k, 16]`` in ``arena``: panel p holds outputs
    16p..16p+15 (zeros past n), input-major."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    packed = arena.zeros((panels, k, PANEL), torch.float32)
    padded = F.pad(weight.detach(), (0, 0, 0, panels * PANEL - n))
    packed.copy_(padded.view(panels, PANEL, k).transpose(1, 2))
    return packed


def linear_packed_cpu(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x [..., in]`` and ``packed = pack(W)``."""
    if x.dim() == 2 and x.is_contiguous():      # the model's case: no reshaping ops
        return torch.ops.tsllm_cpu.linear_packed(x, packed, out_features, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.tsllm_cpu.linear_packed(rows, packed, out_features, bias)
    return y.view(*x.shape[:-1], out_features)
