"""lorakit.heap: freed memory goes back to the system."""

import os

import pytest
import torch

from lorakit.heap import release_freed_memory


def resident_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_freed_blocks_leave_the_resident_set():
    pinned = []
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 250 MiB of 64 KiB blocks: kept by the allocator
    pinned.append(torch.ones(16 * 1024))  # above them on the heap, so freeing them cannot shrink it from the top
    held = resident_mib()
    del blocks
    freed = resident_mib()
    release_freed_memory()
    released = resident_mib()
    assert released < freed - 150 and released < held - 150
    assert pinned[0].sum().item() == 16 * 1024
