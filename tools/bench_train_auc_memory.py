"""Host memory of the per-epoch train AUC on gloo ranks: what each rank keeps while the epoch runs,
and its peak at the epoch's end with `Evaluator.auc` (rows gathered on rank 0 only, as the trainer
does) against `Evaluator.compute` (rows gathered on every rank, as validation does). Prints one
JSON object per rank, rank 0 first.

    python tools/bench_train_auc_memory.py                       # 2 ranks, 4M samples each
    python tools/bench_train_auc_memory.py --ranks 4 --samples-per-rank 2000000

Memory is the process's resident set (Linux /proc), so allocator slack counts; `auc` runs before
`compute` because the peak (ru_maxrss) only grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdaf_dist.train.metrics import Evaluator

MB = 1 << 20
BATCH = 2048


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_main(rank: int, world: int, samples: int, store: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(rank)
    evaluator = Evaluator()
    before = resident_bytes()
    for start in range(0, samples, BATCH):
        n = min(BATCH, samples - start)
        labels = (torch.rand(n, generator=generator) < 0.4).float()
        evaluator.update(torch.randn(n, generator=generator) + labels, labels)
    kept = resident_bytes() - before
    held = sum(column.numel() * column.element_size() for column in evaluator.state_dict().values())
    ready = resident_bytes()
    auc = evaluator.auc()
    auc_peak = peak_bytes() - ready
    ready = resident_bytes()
    computed = evaluator.compute()["auc"]
    compute_peak = peak_bytes() - ready
    assert auc == computed, (auc, computed)
    results[rank] = {
        "rank": rank,
        "samples": samples,
        "bytes_per_sample_held": held / samples,
        "kept_mb": round(kept / MB, 1),
        "auc_peak_mb": round(auc_peak / MB, 1),
        "compute_peak_mb": round(compute_peak / MB, 1),
    }
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples-per-rank", type=int, default=4_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(args.ranks, args.samples_per_rank, str(Path(scratch) / "store"), results), nprocs=args.ranks)
        for rank in range(args.ranks):
            print(json.dumps(results[rank]))


if __name__ == "__main__":
    main()
