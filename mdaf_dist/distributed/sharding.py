"""Where each embedding table lives: a per-table sharding type, TorchRec's planner, and
`DistributedModelParallel`, which shards the tables and wraps the dense modules in DDP.

Sharding types (TorchRec names): table_wise (a whole table on one rank), row_wise (rows split
over ranks), column_wise (embedding dimensions split over ranks), data_parallel (a replica of
the table on every rank, gradients all-reduced). On CPU/gloo with torchrec 1.8, data_parallel
fails at the first lookup of a non-pooled `EmbeddingCollection` whose table feeds two features
(item + hist_item: the output split sizes disagree), so it is refused up front on CPU.

Dense modules: DMP's default DDP wrapper uses `static_graph=True`, whose gradient all-reduce is
started through the model's output tensors as `torch.utils._pytree` flattens them. Our models
return a `ModelOutput` dataclass, which pytree treats as one opaque leaf, so under a static graph
DDP never all-reduces a dense gradient and every rank silently trains its own dense weights. The
dense modules are therefore wrapped in an ordinary (dynamic-graph) DDP, which all-reduces from
the gradient hooks whatever the output type. Every dense parameter of every model is used in
every step (an out-of-data rank's padding batch included), so `find_unused_parameters` stays off.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType

from mdaf_dist.config import ShardingConfig
from mdaf_dist.distributed.env import DistEnv
from mdaf_dist.errors import UserError

# config.ShardingType -> torchrec's name
SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}
# sharding types that cannot run on a device type, and why
UNSUPPORTED = {"cpu": {"data_parallel": "the CPU data-parallel lookup of a shared non-pooled table fails in torchrec 1.8"}}

PLAN_JSON = "sharding_plan.json"
PLAN_TEXT = "sharding_plan.txt"


def supported_sharding_types(device: torch.device) -> List[str]:
    return [name for name in SHARDING_TYPES if name not in UNSUPPORTED.get(device.type, {})]


def table_sharding_types(cfg: ShardingConfig, tables: List[str], device: torch.device) -> Dict[str, str]:
    """table -> sharding type, checked: unknown tables or types, and types that cannot run on
    this device, are a UserError naming what would work."""
    unknown_tables = sorted(set(cfg.tables) - set(tables))
    if unknown_tables:
        raise UserError(f"sharding.tables names unknown tables {unknown_tables}; the tables are {tables}")
    chosen = {table: cfg.tables.get(table, cfg.default) for table in tables}
    runnable = supported_sharding_types(device)
    for table, kind in chosen.items():
        if kind not in runnable:
            why = UNSUPPORTED[device.type][kind]
            raise UserError(
                f"sharding type {kind} (table {table}) cannot run on {device.type}: {why}; "
                f"use one of {runnable}"
            )
    return chosen


def plan_sharding(model: nn.Module, types: Dict[str, str], env: DistEnv) -> ShardingPlan:
    """The planner's plan with each table constrained to its configured sharding type; every rank
    gets the same plan (rank 0 plans, the others receive it)."""
    constraints = {table: ParameterConstraints(sharding_types=[SHARDING_TYPES[kind]]) for table, kind in types.items()}
    # the factory (torchrec warns at every Topology built directly); same values as Topology(...)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=env.world_size, local_world_size=env.local_world_size),
        kernel_config=KernelConfig(compute_device=env.device.type),
    )
    # a fixed share of memory kept for dense modules and activations, as torchrec recommends over
    # its default heuristic (which over-estimates dense sizes)
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, storage_reservation=FixedPercentageStorageReservation(0.15)
    )
    return planner.collective_plan(model, None, dist.GroupMember.WORLD)


def describe_plan(plan: ShardingPlan) -> Dict[str, Dict[str, Dict[str, object]]]:
    """module -> table -> sharding type, compute kernel, ranks and shard offsets/sizes (JSON-able)."""
    described: Dict[str, Dict[str, Dict[str, object]]] = {}
    for module, tables in plan.plan.items():
        described[module] = {}
        for table, sharding in tables.items():
            shards = getattr(sharding.sharding_spec, "shards", None) or []
            described[module][table] = {
                "sharding_type": sharding.sharding_type,
                "compute_kernel": sharding.compute_kernel,
                "ranks": list(sharding.ranks or []),
                "shards": [
                    {"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)} for s in shards
                ],
            }
    return described


def save_plan(plan: ShardingPlan, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PLAN_JSON).write_text(json.dumps(describe_plan(plan), indent=2))
    (out_dir / PLAN_TEXT).write_text(str(plan) + "\n")


def shard_model(model: nn.Module, cfg: ShardingConfig, env: DistEnv, out_dir: Optional[Path] = None) -> DistributedModelParallel:
    """Plan and shard `model` (its tables at `model.embeddings`, ideally on the meta device and
    with their optimizer already fused by `apply_optimizer_in_backward`). Rank 0 prints the plan
    and saves it as JSON and text in `out_dir`."""
    tables = [table.name for table in model.embeddings.embedding_configs()]
    types = table_sharding_types(cfg, tables, env.device)
    plan = plan_sharding(model, types, env)
    if env.is_main:
        print(f"sharding plan ({env.world_size} ranks):\n{plan}", flush=True)
        if out_dir is not None:
            save_plan(plan, out_dir)
    with warnings.catch_warnings():
        # torchrec 1.8's own DDP wrapper passes the deprecated argument; nothing for a user to change
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            plan=plan,
            device=env.device,
            data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False),
        )
