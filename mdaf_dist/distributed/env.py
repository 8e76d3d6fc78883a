"""Device, backend and process group, read from the launcher's environment.

torchrun, TorchX and `elastic_launch` set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. A plain `python -m mdaf_dist.train` sets none of them: it becomes a
world of one whose process group lives in an in-memory store, so the trainer, the sharding
planner and the collective metrics run the same code with one process or many. A worker of
torchrun dies with torchrun's agent (see lifetime.py).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, TypeVar

import torch
import torch.distributed as dist

from mdaf_dist.distributed.lifetime import end_with_launcher
from mdaf_dist.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """CUDA (one GPU per local rank) when asked for or available, else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_restartable() -> None:
    """torchrun --max-restarts, unless its agent keeps the rendezvous store to itself: torch 2.13's
    agent shares that store with the workers' process group and keeps it across restarts, so a
    restarted attempt finds its predecessors' addresses there and fails to connect, or hangs until
    the collective timeout. Refuse to start rather than fail at the first restart."""
    if _int_env("TORCHELASTIC_MAX_RESTARTS", 0) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError(
            "torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: "
            "without it the restarted workers cannot connect to each other (torch 2.13)"
        )


def init_distributed(device: str = "auto", timeout: Optional[datetime.timedelta] = None) -> DistEnv:
    """Join (or create) the default process group: NCCL on CUDA, gloo on CPU. A group that the
    caller initialised already (tests, notebooks) is used as it is."""
    end_with_launcher()
    check_restartable()
    local_rank = _int_env("LOCAL_RANK", 0)
    chosen = resolve_device(device, local_rank)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        kwargs = {} if timeout is None else {"timeout": timeout}
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    world_size = dist.get_world_size()
    return DistEnv(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=_int_env("LOCAL_WORLD_SIZE", world_size),
        device=chosen,
        backend=dist.get_backend(),
    )


@contextmanager
def distributed(device: str = "auto", timeout: Optional[datetime.timedelta] = None) -> Iterator[DistEnv]:
    """`init_distributed` for the length of a block; the group is destroyed afterwards only if
    this block created it."""
    created = not dist.is_initialized()
    env = init_distributed(device, timeout)
    try:
        yield env
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def decided_on_rank_0(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 only, its answer (or its UserError) given to every rank: for a
    choice that must be the same everywhere and that reading files on each rank could split
    (which checkpoint to resume from, whether the run's directory is free)."""
    answer: list = [None, None]
    if dist.get_rank() == 0:
        try:
            answer[0] = decide()
        except UserError as e:
            answer[1] = str(e)
    dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise UserError(answer[1])
    return answer[0]


def collective_device() -> torch.device:
    """Where tensors for a collective must live: NCCL moves only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: List[float], op: dist.ReduceOp) -> List[float]:
    """`values` reduced over every rank, in float64 (a collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_max(value: float) -> int:
    return int(all_reduce([value], dist.ReduceOp.MAX)[0])
