"""The tables' backward with row-wise Adagrad on CPU, fbgemm's kernel against ours, in one process;
prints JSON.

One fbgemm table batch of the paper's item table (346,865 rows of 64) takes the history lookup of
one paper-config step (77,000 ids of which 60,000 unique, in bags of 50); each kernel runs the
op's backward on the same ids (fbgemm's first, then ours is installed: the override cannot be
undone in a process), warm (call after call) and cold (--flush-mb written between calls, so that
the table and the gradient come from memory, as in a training step). Reported: the best and the
median of --iters calls, wall and CPU seconds.

    python tools/bench_table_backward.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen
from machine import gemm_gflops

from mdaf_dist.models import embedding_backward


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=346_865, help="table rows")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ids", type=int, default=77_000, help="ids per batch")
    parser.add_argument("--unique", type=int, default=60_000, help="distinct ids among them")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--iters", type=int, default=10, help="timed calls after one warm-up")
    parser.add_argument("--flush-mb", type=int, default=700, help="MB written before each cold call (more than the caches)")
    return parser.parse_args(argv)


def time_backward(tbe, ids, offsets, grad, iters: int, flush: torch.Tensor | None = None) -> dict:
    """Wall and CPU seconds of the backward op alone (the forward and the flush outside the clock)."""
    walls, cpus = [], []
    for _ in range(iters + 1):
        out = tbe(ids, offsets)
        if flush is not None:
            flush.add_(1.0)
        wall, cpu = time.perf_counter(), time.process_time()
        out.backward(grad)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    walls, cpus = sorted(walls[1:]), sorted(cpus[1:])
    return {"best_s": round(walls[0], 5), "median_s": round(walls[iters // 2], 5), "median_cpu_s": round(cpus[iters // 2], 5)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, pooling_mode=PoolingMode.NONE, learning_rate=1e-3, eps=1e-8,
    )
    distinct = torch.randperm(args.rows, generator=generator)[: args.unique]
    repeats = distinct[torch.randint(0, args.unique, (args.ids - args.unique,), generator=generator)]
    ids = torch.cat([distinct, repeats])[torch.randperm(args.ids, generator=generator)]
    offsets = torch.cat([torch.arange(0, args.ids, 50), torch.tensor([args.ids])])
    grad = torch.randn(args.ids, args.dim, generator=generator)
    flush = torch.zeros(args.flush_mb * 2**20 // 4)

    def both() -> dict:
        return {"warm": time_backward(tbe, ids, offsets, grad, args.iters), "cold": time_backward(tbe, ids, offsets, grad, args.iters, flush)}

    result = {"gemm_gflops_one_core": gemm_gflops(), "threads": args.threads, "rows": args.rows, "dim": args.dim,
              "ids": args.ids, "unique": args.unique, "fbgemm": both()}
    if not embedding_backward.install():
        raise SystemExit("the fused CPU kernels cannot be built here: nothing to compare")
    result["ours"] = both()
    result["speedup_median"] = {cache: round(result["fbgemm"][cache]["median_s"] / result["ours"][cache]["median_s"], 2) for cache in ("warm", "cold")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
