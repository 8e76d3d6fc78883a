"""Loader throughput on one core: samples/s of full batches (histories gathered, KJT built) with
no DataLoader workers, so the number is per core. Builds a synthetic prepared directory unless
--data-dir names one. Prints one JSON object.

    python tools/bench_loader.py                       # ~2M samples, batches of 2048, L = 50
    python tools/bench_loader.py --data-dir DIR --split train
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mdaf_dist.config import LoaderConfig
from mdaf_dist.data.layout import SAMPLE_SCHEMA, SAMPLES_DIR, Events, write_events, write_meta
from mdaf_dist.data.loader import make_loader, num_samples
from machine import gemm_gflops


def build_prepared_dir(out: Path, samples: int, users: int, mean_clicks: float, row_group: int, seed: int) -> None:
    """Clicks per user are log-normal (a long tail of heavy users, as in UserBehavior); samples
    sit at uniform positions of their user's clicks, users drawn in proportion to their clicks."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    clicks = np.maximum(1, rng.lognormal(np.log(mean_clicks) - sigma**2 / 2, sigma, users)).astype(np.int64)
    offsets = np.concatenate([[0, 0], np.cumsum(clicks)])
    total = int(offsets[-1])
    items = (rng.zipf(1.3, total) % 4_000_000 + 1).astype(np.int32)
    categories = (items % 9000 + 1).astype(np.int32)
    write_events(out, Events(items, categories, np.arange(total, dtype=np.int32), offsets))
    write_meta(out, {"synthetic": True, "num_users": users + 1})
    user = np.sort(rng.choice(users, samples, p=clicks / total)) + 1
    pos = rng.integers(1, clicks[user - 1] + 1)
    target = rng.integers(1, 4_000_000, samples)
    columns = [user, pos, target, target % 9000 + 1, rng.random(samples) < 0.4, np.zeros(samples)]
    table = pa.table([pa.array(c, f.type) for c, f in zip(columns, SAMPLE_SCHEMA)], schema=SAMPLE_SCHEMA)
    (out / SAMPLES_DIR / "train").mkdir(parents=True)
    pq.write_table(table, out / SAMPLES_DIR / "train" / "part-00000.parquet", row_group_size=row_group)


def measure(data_dir: Path, split: str, cfg: LoaderConfig, history_length: int) -> dict:
    loader = make_loader(data_dir, split, cfg, history_length=history_length)
    samples, history_values, start = 0, 0, time.perf_counter()
    for batch in loader:
        samples += batch.batch_size
        history_values += int(batch.features.lengths()[3 * batch.batch_size : 4 * batch.batch_size].sum())
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds),
        "mean_history": round(history_values / max(samples, 1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="a prepared directory (default: build a synthetic one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--mean-clicks", type=float, default=90.0)
    parser.add_argument("--row-group", type=int, default=1 << 17)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--history-length", type=int, default=50)
    parser.add_argument("--shuffle-buffer", type=int, default=LoaderConfig.shuffle_buffer)
    parser.add_argument("--history-categories", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = LoaderConfig(
        batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer, num_workers=0, seed=args.seed,
        history_categories=args.history_categories,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = Path(scratch)
            build_prepared_dir(data_dir, args.samples, args.users, args.mean_clicks, args.row_group, args.seed)
        result = {
            "data_dir": str(args.data_dir or "synthetic"),
            "split_samples": num_samples(data_dir, args.split),
            "batch_size": cfg.batch_size,
            "history_length": args.history_length,
            "history_categories": cfg.history_categories,
            **measure(data_dir, args.split, cfg, args.history_length),
        }
    result["gemm_gflops_one_core"] = gemm_gflops()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
