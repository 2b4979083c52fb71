"""Long-lived host tensors in 2 MiB pages: the packed weights and the KV cache on CPU.

A decode step at batch 1 reads every weight once, as a few long sequential streams; on 4 KiB
pages each stream crosses a page (and, in a VM, a two-level page walk) every 4 KiB. Measured
on SmolLM2's 120 layer matrices, one row, one thread (this project's AMD EPYC, Firecracker VM;
docs/benchmarks.md): 36-37 ms a pass from the loader's memory, 32-33 ms from fresh 4 KiB-page
copies, 29-30 ms from 2 MiB pages (14.1-14.6 GB/s, above a 4 KiB-page stream probe's 13.9).

Linux backs a private anonymous mapping advised ``MADV_HUGEPAGE`` with transparent huge pages
when THP is ``always`` or ``madvise``. ``HugePageArena`` hands out tensors back to back from
such mappings; a mapping is never reused, so every tensor starts zero-filled, and it is
unmapped when the last tensor in it is freed. Where the mappings cannot be made (another OS,
a non-CPU device) ``zeros`` falls back to ``torch.zeros``.
"""
import ctypes
import ctypes.util
import math
import mmap

import torch

__all__ = ["HUGE_PAGE", "HugePageArena", "release_freed_heap"]

HUGE_PAGE = 2 << 20
_ALIGN = 64     # bytes: every tensor starts on a cache line


class HugePageArena:
    """Bump allocator over ``chunk_bytes`` huge-page mappings; a tensor of more than a quarter
    of a chunk gets a mapping of its own (so at most a quarter of a chunk is left unused)."""

    def __init__(self, chunk_bytes: int = 32 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None     # uint8 view of the current mapping
        self._used = 0

    def zeros(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero-filled contiguous tensor of ``shape``; in huge pages where possible."""
        nbytes = math.prod(shape) * dtype.itemsize
        if torch.device(device).type != "cpu" or nbytes == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        if nbytes > self.chunk_bytes // 4:
            raw = _map(nbytes)[:nbytes]
        else:
            if self._chunk is None or self._used + nbytes > self._chunk.numel():
                self._chunk, self._used = _map(self.chunk_bytes), 0
            raw = self._chunk[self._used:self._used + nbytes]
            self._used += -(-nbytes // _ALIGN) * _ALIGN
        return raw.view(dtype).view(shape)


def _map(nbytes: int) -> torch.Tensor:
    """``nbytes`` rounded up to whole huge pages, as a uint8 tensor starting on a huge-page
    boundary inside a fresh private mapping (``torch.zeros`` where mmap/madvise fail)."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    try:
        # one extra huge page of address space so an aligned start fits; never touched
        mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        return torch.zeros(size, dtype=torch.uint8)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)     # keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + size]


def release_freed_heap() -> None:
    """Give the C heap's freed memory back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Loading a quantized file frees its transient copies (decoded values, fp64
    round-trip checks) in many pieces that glibc keeps: SmolLM2's Q4_1 file left 106 MB of
    packed weights and ~250 MB of freed heap in the RSS before the trim (measured)."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
