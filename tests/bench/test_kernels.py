"""bench/kernels.py needs a GPU: without one it must stop with a clear message."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit only")
def test_bench_kernels_exits_clearly_without_cuda() -> None:
    result = subprocess.run([sys.executable, "bench/kernels.py", "--iters", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no CUDA device" in result.stderr
