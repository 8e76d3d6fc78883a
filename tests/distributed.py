"""Run a function on N CPU ranks (gloo), the torchrec test style: `elastic_launch` spawns the
ranks and they meet at a c10d store on 127.0.0.1, so no torchrun is needed inside tests.

Every collective has a deadline (the process group's timeout), so a rank that waits for a peer
that never comes fails the test with a gloo timeout instead of hanging it.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any, Callable, List

import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

COLLECTIVE_TIMEOUT_S = 60


def _in_process_group(fn: Callable[..., Any], timeout_s: float, *args: Any) -> Any:
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
