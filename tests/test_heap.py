import os

import numpy as np
import pytest

from mdaf_dist import heap

pytestmark = pytest.mark.skipif(heap._libc() is None or not os.path.exists("/proc/self/statm"), reason="glibc's mallopt, Linux's /proc")
MB = 1 << 20


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kept_after_freeing_an_array() -> int:
    """Resident bytes left by filling a 64 MB array and freeing it."""
    before = resident()
    np.ones(64 * MB // 8, dtype=np.int64)
    return resident() - before


def test_freed_arrays_stay_in_the_heap_inside_and_go_back_after():
    start = resident()
    assert kept_after_freeing_an_array() < 16 * MB  # glibc unmaps it when freed
    with heap.reused_heap():
        assert kept_after_freeing_an_array() > 48 * MB  # kept for the next one
    assert resident() - start < 16 * MB
    assert kept_after_freeing_an_array() < 16 * MB  # malloc's defaults are back
