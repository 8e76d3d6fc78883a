"""The machine's one-core fp32 GEMM speed, printed beside every benchmark's figures: benchmark
numbers from different machines compare through their ratio to it."""

from __future__ import annotations

import time

import torch


def gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an n x n fp32 matrix product on one thread (the best of `repeats` products)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return round(2 * n**3 / best / 1e9, 1)
