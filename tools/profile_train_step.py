"""Where a training step's time goes: rank 0's CPU and wall seconds per step of the real trainer
(sharded tables, their fused optimizer, DDP, the loader) over --steps steps after warm-up, then a
torch.profiler table of its ops over as many more; rank 0 prints both. Run it under torchrun like
the trainer:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tools/profile_train_step.py \\
        --config configs/paper.yaml data_dir=DIR output_dir=/tmp/profile

CPU seconds inflate less than wall seconds on a busy machine (one thread per rank); self CPU
time per op, sorted: compare the split of a step before and after a change on the same machine.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from mdaf_dist.config import load_config
from mdaf_dist.distributed.env import distributed
from mdaf_dist.heap import reused_heap
from mdaf_dist.train.trainer import Trainer


class _NoLog:
    """The trainer's step logger, silenced: nothing but the table is printed."""

    def step(self, step: int, scalars) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="YAML config; repeat to overlay files")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    parser.add_argument("--steps", type=int, default=6, help="steps timed, then as many profiled")
    parser.add_argument("--rows", type=int, default=30, help="ops in the table")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data_dir=DIR output_dir=DIR")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "train.patience=0", "checkpoint.every_steps=0", "logging.progress_bar=false"])
    with distributed(cfg.train.device) as env, reused_heap():  # the allocator as `Trainer.fit` runs it
        trainer = Trainer(cfg, env)
        cfg.train.max_steps = args.warmup
        trainer._train_epoch(_NoLog())
        cfg.train.max_steps = args.warmup + args.steps
        cpu, wall = time.process_time(), time.perf_counter()
        trainer._train_epoch(_NoLog())
        cpu, wall = (time.process_time() - cpu) / args.steps, (time.perf_counter() - wall) / args.steps
        cfg.train.max_steps = args.warmup + 2 * args.steps
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            trainer._train_epoch(_NoLog())
        if env.is_main:
            samples = cfg.loader.batch_size * env.world_size
            print(f"rank 0 of {env.world_size}, {args.steps} steps after {args.warmup}: {cpu:.3f} CPU s and {wall:.3f} wall s "
                  f"per step, {samples / wall:.1f} samples/s of all ranks")
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
