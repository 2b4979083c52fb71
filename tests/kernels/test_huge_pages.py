"""HugePageArena: zero-filled tensors back to back without overlap, aligned, alive after the
arena is gone, torch.zeros off the CPU; and, where Linux offers transparent huge pages, backed
by them (the reason it exists)."""
import gc
from pathlib import Path

import pytest
import torch

from kernels import HugePageArena
from kernels.huge_pages import HUGE_PAGE

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_tensors_are_zero_filled_disjoint_and_aligned() -> None:
    arena = HugePageArena(chunk_bytes=1 << 20)
    shapes = [(3, 5), (7,), (64, 16), (2, 3, 4), (1000,), (300, 300)]    # the last: its own mapping
    tensors = [arena.zeros(s, torch.float32) for s in shapes]
    tensors.append(arena.zeros((9, 2), torch.float16))
    for i, t in enumerate(tensors):
        assert t.shape == torch.Size(shapes[i] if i < len(shapes) else (9, 2))
        assert t.is_contiguous() and torch.count_nonzero(t) == 0
        assert t.data_ptr() % 64 == 0
        t.fill_(i + 1)
    for i, t in enumerate(tensors):
        assert (t == i + 1).all()       # no later tensor wrote into an earlier one


def test_tensors_outlive_the_arena() -> None:
    arena = HugePageArena(chunk_bytes=1 << 20)
    small, large = arena.zeros((10,), torch.float32), arena.zeros((1 << 19,), torch.float32)
    del arena
    gc.collect()
    small.fill_(2.0)
    large.fill_(3.0)
    assert small.sum() == 20.0 and large.sum() == 3.0 * (1 << 19)


def test_other_devices_get_torch_zeros() -> None:
    t = HugePageArena().zeros((4, 4), torch.float32, "meta")
    assert t.device.type == "meta" and t.shape == (4, 4)


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages on this machine")
def test_memory_is_backed_by_huge_pages() -> None:
    t = HugePageArena().zeros((4 * HUGE_PAGE // 4,), torch.float32)     # 8 MiB, own mapping
    t.fill_(1.0)
    assert t.data_ptr() % HUGE_PAGE == 0
    assert _anon_huge_kib(t.data_ptr()) >= HUGE_PAGE // 1024


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(part, 16) for part in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0
