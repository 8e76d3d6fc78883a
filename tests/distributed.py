"""Helpers for multi-rank tests. Run a function on N CPU ranks (gloo), the torchrec test style: `elastic_launch` spawns the
ranks and they meet at a c10d store on 127.0.0.1, so no torchrun is needed inside tests.

Every collective has a deadline (the process group's timeout), so a rank that waits for a peer
that never comes fails the test with a gloo timeout instead of hanging it.
"""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from typing import Any, Callable, List

import torch
import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mdaf_dist.config import Config, PrepareConfig, load_config
from mdaf_dist.data.prepare import prepare
from mdaf_dist.data.synth import generate

COLLECTIVE_TIMEOUT_S = 60


def _in_process_group(fn: Callable[..., Any], timeout_s: float, *args: Any) -> Any:
    # one intra-op thread per rank, as torchrun sets for several processes per node: ranks that
    # share a few cores with busy-waiting OpenMP threads slow down by an order of magnitude
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> List[Any]:
    """Run `fn(*args)` on `world_size` ranks (module-level `fn`, picklable args); return each
    rank's result, rank 0 first. A rank that raises fails the whole launch."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    results = elastic_launch(config, entrypoint=_in_process_group)(fn, timeout_s, *args)
    return [results[rank] for rank in range(world_size)]


def prepare_tiny_data(root: Path, rows: int = 2250, seed: int = 3, **settings: Any) -> Path:
    """Synthetic UserBehavior rows -> a prepared directory small enough for 2-rank tests (2,630
    training samples: 11 batches of 256); `settings` are further PrepareConfig fields (e.g. test_days=1)."""
    root.mkdir(parents=True, exist_ok=True)
    generate(str(root / "raw.csv"), rows, seed=seed, progress=False)
    prepare(PrepareConfig(input=str(root / "raw.csv"), out=str(root / "data"), samples_row_group=256, **settings), 8, progress=False)
    return root / "data"


def tiny_config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """A model with D=8, L=8, no dropout (so runs are comparable across process counts), batch 32."""
    base = [
        f"data_dir={data_dir}", f"output_dir={output_dir}", "train.device=cpu",
        "model.embedding_dim=8", "model.history_length=8", "model.d_state=4", "model.dropout=0.0",
        "loader.batch_size=32", "loader.eval_batch_size=256", "loader.num_workers=0",
        "loader.shuffle_buffer=256", "train.warmup_steps=3", "train.lr=0.003", "train.embedding_lr=0.05", "train.embedding_eps=1e-14",
        "logging.tensorboard=false", "logging.progress_bar=false",
    ]  # fmt: skip
    return load_config(None, [*base, *overrides])
