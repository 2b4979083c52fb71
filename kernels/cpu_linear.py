"""Linear layers of small CPU batches through the compiled streaming kernel (``cpu/linear.cpp``).

With a handful of rows a linear layer only has to read its weight once; torch's GEMM reaches
about two thirds of the memory bandwidth there, the streaming kernel nearly all of it. Above
``MAX_ROWS`` rows (prefill, large decode batches) the layer is compute-bound and torch's GEMM
is faster, so it keeps those, as it keeps every non-fp32 or non-contiguous case.
"""
import torch
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "linear_cpu"]

MAX_ROWS = 16


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of shape ``[rows, in_features]``."""
    if (x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype == torch.float32
            and x.is_contiguous() and weight.is_contiguous()):
        return torch.ops.tsllm_cpu.linear(x, weight, bias)
    return F.linear(x, weight, bias)
