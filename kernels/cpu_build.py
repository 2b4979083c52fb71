"""Builds the compiled CPU kernels (``kernels/cpu/*.cpp``) at first use and loads them.

The sources are compiled by the machine's C++ compiler through ``torch.utils.cpp_extension``
(ninja) with ``-O3 -march=native`` (no implicit FMA contraction), into a cache directory keyed
by the sources (their text and where they are), the torch version and the CPU, so a fresh
clone builds once (about two minutes) and later processes load the cached library in
milliseconds. ``load`` never raises: without a compiler or ninja it logs
a warning once and returns False, and the callers keep the PyTorch reference.
"""
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

__all__ = ["cache_dir", "load"]

SOURCES = ("paged_attention.cpp", "store_kv.cpp", "linear.cpp", "matrix.cpp", "int_matrix.cpp",
           "norm_rope.cpp", "activation.cpp", "decoder.cpp", "logits.cpp")
HEADERS = ("vec.h", "lanes.h", "paged_decode.h", "ops.h", "matrix_tiles.h")
# FMAs only where written; OpenMP so that at::parallel_for (inlined from ATen's headers) runs
# on torch's intra-op threads: without it every op of the extension is single-threaded.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")
_SRC = Path(__file__).resolve().parent / "cpu"
_log = logging.getLogger("kernels")
_state: dict[str, bool] = {}


def cache_dir() -> Path:
    """Where this source, torch and CPU combination is built (``TORCHSERVE_LLM_CACHE`` moves the root)."""
    root = Path(os.environ.get("TORCHSERVE_LLM_CACHE", Path.home() / ".cache" / "torchserve-llm"))
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((_SRC / name).read_bytes())
    digest.update(" ".join((torch.__version__, platform.machine(), _cpu_flags()) + CFLAGS).encode())
    # and by where the sources are: ninja's build file names them by absolute path, so two
    # clones sharing one directory rebuilt it on every switch (a worker that rebuilt past its
    # start timeout left a stale lock that hung every later load)
    digest.update(str(_SRC).encode())
    return root / "cpu-kernels" / digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith("flags")), "")


def load() -> bool:
    """True once ``torch.ops.tsllm_cpu`` holds the compiled ops; builds them if needed."""
    if "ok" not in _state:
        _state["ok"] = _build()
    return _state["ok"]


def _build() -> bool:
    from torch.utils import cpp_extension
    out = cache_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "tsllm_cpu.so").exists():
            _log.info("building the CPU kernels into %s (first use on this machine)", out)
        cpp_extension.load("tsllm_cpu", [str(_SRC / s) for s in SOURCES],
                           extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"],
                           build_directory=str(out),
                           is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the reference
        detail = " | ".join(str(e).strip().splitlines()[-3:])
        _log.warning("CPU kernels unavailable, using the PyTorch reference: %s", detail)
        return False
    return True
