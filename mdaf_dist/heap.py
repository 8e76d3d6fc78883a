"""Freed arrays and tensors reused instead of handed back to the kernel, for passes that allocate
many large temporaries: `mdaf prepare`'s scan and partitions, and training (`Trainer.fit`).

glibc's malloc maps each allocation over 32 MB on its own and unmaps it when freed, so the next
array of that size takes fresh pages that the kernel zeroes one by one: in `mdaf prepare`, whose
chunks of `samples.CHUNK` rows make 64 MB temporaries, clearing pages took a quarter of the CPU
time; a training step allocates and frees dozens of [batch, L, d] tensors of 25 to 50 MB (a
fresh [2048, 50, 128] product took 31 ms that way, 11 ms inside, 3 ms in place). Inside
`reused_heap` every allocation comes from the heap and freed memory stays there for the next one;
on exit the heap's free memory goes back to the kernel and malloc's defaults return. Elsewhere
than glibc it changes nothing.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

# mallopt's parameters (malloc.h) and glibc's defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 << 10, 65536
_KEEP_ALL = (1 << 31) - 1  # an int: no trimming of the heap's free top while inside


def _libc():
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def reused_heap() -> Iterator[None]:
    """Every allocation from the heap, freed memory kept for the next, inside; all of it handed back after."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
