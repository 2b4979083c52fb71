"""Linear layers of decode-sized CPU batches through the compiled kernel (``cpu/linear.cpp``).

With a handful of rows a linear layer only has to read its weight once: torch's GEMM (MKL)
reaches about two thirds of the memory bandwidth there, the streaming kernel all of it
(SmolLM2's layer matrices, one thread: 1 row 0.79x MKL's time, 8 rows 0.65x, 16 rows 0.76x,
32 rows 0.90x, 64 rows 0.97x). Above ``MAX_ROWS`` rows (prefill chunks) torch's GEMM keeps
the layer, as it keeps every non-fp32 or non-contiguous case.
"""
import torch
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "linear_cpu"]

MAX_ROWS = 64


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape ``[rows, in_features]``."""
    if (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype == torch.float32
            and x.is_contiguous() and weight.is_contiguous()):
        return torch.ops.tsllm_cpu.linear(x, weight, bias)
    return F.linear(x, weight, bias)
