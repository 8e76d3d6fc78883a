"""End-to-end training throughput on CPU ranks: samples/s of `torchrun -m mdaf_dist.train` with 1
and 2 gloo ranks on the same prepared data, and the loader's share of a step. Prints one JSON object.

    python tools/bench_train.py                              # synthetic data, configs/smoke.yaml
    python tools/bench_train.py --data-dir DIR --ranks 1 2 4 --steps 200 --batch-size 1024
    python tools/bench_train.py --pipelines auto none         # the train pipeline against none

Throughput comes from the run's own TensorBoard events: the wall time between the first and the
last `train/loss` report, so process start, sharding and the final evaluation are left out.
The trainer does not time its loader, so the loader's share is measured here: rank 0's loader
alone, over the same batches, divided by the step time. Both run on the same cores, so on a
busy machine the share is a lower bound. With several --pipelines, each `train.pipeline` runs at
every world size, and `vs_first_pipeline` gives each one's samples/s over the first's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Dict, List, get_args

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mdaf_dist.config import Config, TrainPipeline, load_config
from mdaf_dist.data.loader import make_loader, num_samples
from mdaf_dist.data.prepare import prepare
from mdaf_dist.data.synth import generate
from machine import gemm_gflops

REPO = Path(__file__).resolve().parents[1]


def build_data(cfg: Config, scratch: Path, rows: int, seed: int) -> Path:
    """Synthetic UserBehavior rows, prepared with the config's settings."""
    cfg.prepare.input, cfg.prepare.out = str(scratch / "raw.csv"), str(scratch / "data")
    generate(cfg.prepare.input, rows, seed=seed, progress=False)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        prepare(cfg.prepare, cfg.model.history_length, progress=False)
    return Path(cfg.prepare.out)


def train(config: str, overrides: List[str], world_size: int, threads: int) -> float:
    """Run the trainer under torchrun with `threads` intra-op threads per rank; its wall time in
    seconds. torchrun sets 1 thread per rank for 2+ ranks but leaves a single rank at every core,
    so the bench sets it for all world sizes alike."""
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(world_size), "-m", "mdaf_dist.train", "--config", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training with {world_size} ranks failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def loader_seconds_per_batch(cfg: Config, data_dir: Path, world_size: int, first: int, last: int) -> float:
    """Rank 0's loader alone over its batches [first, last) of the first epoch."""
    loader = make_loader(data_dir, "train", cfg.loader, history_length=cfg.model.history_length, rank=0, world_size=world_size)
    batches = iter(loader)
    for _ in islice(batches, first):
        pass
    start = time.perf_counter()
    count = sum(1 for _ in islice(batches, last - first))
    return (time.perf_counter() - start) / count


def measure(cfg: Config, config: str, data_dir: Path, out: Path, world_size: int, pipeline: str, threads: int, steps: int, log_every: int) -> Dict[str, float]:
    overrides = [
        f"data_dir={data_dir}", f"output_dir={out}", f"loader.batch_size={cfg.loader.batch_size}", f"train.pipeline={pipeline}",
        f"train.max_steps={steps}", "train.patience=0", "checkpoint.every_steps=0",
        f"logging.log_every={log_every}", "logging.progress_bar=false", "logging.tensorboard=true",
    ]  # fmt: skip
    wall = train(config, overrides, world_size, threads)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    # from the first report on: the steps before it include warm-up (first batches, allocations)
    reports = events.Scalars("train/loss")
    first, last = reports[0], reports[-1]
    samples_per_step = cfg.loader.batch_size * world_size
    step_s = (last.wall_time - first.wall_time) / (last.step - first.step)
    loader_s = loader_seconds_per_batch(cfg, data_dir, world_size, first.step, last.step)
    return {
        "world_size": world_size,
        "pipeline": pipeline,
        "threads_per_rank": threads,
        "samples_per_s": round(samples_per_step / step_s, 1),
        "step_ms": round(step_s * 1e3, 2),
        "loader_ms_per_step": round(loader_s * 1e3, 2),
        "loader_share": round(loader_s / step_s, 4),
        "measured_steps": last.step - first.step,
        "process_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml", help="model and loader settings (relative to the repository root)")
    parser.add_argument("--data-dir", type=Path, help="a prepared directory (default: synthesise and prepare --rows rows)")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic UserBehavior rows")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--pipelines", nargs="+", default=["auto"], choices=get_args(TrainPipeline), help="train.pipeline values to run, each at every world size")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=5, help="steps between timing reports")
    parser.add_argument("--batch-size", type=int, help="per-rank batch size (default: the config's)")
    # more threads than free cores makes OpenMP spin-wait: on a shared 2-core machine a single rank
    # with 2 threads ran 10x slower than with 1
    parser.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        parser.error("--steps must be at least twice --log-every: throughput is timed between reports")
    torch.set_num_threads(args.threads_per_rank)  # the loader timed here runs like one rank's
    cfg = load_config(str(REPO / args.config))
    if args.batch_size:
        cfg.loader.batch_size = args.batch_size
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir.resolve() if args.data_dir else build_data(cfg, Path(scratch), args.rows, args.seed)
        train_samples = num_samples(data_dir, "train")
        for world_size in args.ranks:
            # an epoch boundary inside the timed steps would time a validation pass too
            if -(-train_samples // (cfg.loader.batch_size * world_size)) < args.steps:
                sys.exit(f"{train_samples} training samples make fewer than {args.steps} steps with {world_size} ranks: use more --rows or fewer --steps")
        runs = [
            measure(cfg, args.config, data_dir, Path(scratch) / f"run-{p}-{w}", w, p, args.threads_per_rank, args.steps, args.log_every)
            for w in args.ranks
            for p in args.pipelines
        ]
    result = {
        "config": args.config,
        "data_dir": str(args.data_dir or f"synthetic ({args.rows} rows)"),
        "train_samples": train_samples,
        "batch_size_per_rank": cfg.loader.batch_size,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    first = [r for r in runs if r["pipeline"] == args.pipelines[0]]
    if len(first) > 1:
        result["speedup_vs_first"] = {str(r["world_size"]): round(r["samples_per_s"] / first[0]["samples_per_s"], 3) for r in first[1:]}
    # samples/s of each further pipeline over the first's, per world size
    for pipeline in args.pipelines[1:]:
        result.setdefault("vs_first_pipeline", {})[pipeline] = {
            str(r["world_size"]): round(r["samples_per_s"] / f["samples_per_s"], 3) for r, f in zip((r for r in runs if r["pipeline"] == pipeline), first)
        }
    result["gemm_gflops_one_core"] = gemm_gflops()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
