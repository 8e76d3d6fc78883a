"""2-rank sharded training (gloo, DistributedModelParallel) equals 1-process unsharded training.

Both start from the same weights and see the same global batches: batch k of 32 samples is
trained whole by the reference and split in halves of 16 across the two ranks. The tables use
row-wise Adagrad in both (fused into the backward when sharded, an ordinary optimizer in the
reference); the only difference is that sharded table gradients are summed over ranks rather
than averaged, which row-wise Adagrad's update is invariant to up to eps (1e-14 here). The dense
weights must stay identical replicas on every rank (DDP all-reduces their gradients).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mdaf_dist.config import ShardingConfig
from mdaf_dist.data.layout import SAMPLES_DIR, open_events
from mdaf_dist.data.loader import make_batch
from mdaf_dist.distributed.checkpoint import Checkpointer
from mdaf_dist.distributed.env import distributed
from mdaf_dist.distributed.sharding import supported_sharding_types, table_sharding_types
from mdaf_dist.errors import UserError
from mdaf_dist.train.trainer import Trainer
from tests.distributed import prepare_tiny_data, run_ranks, tiny_config

GLOBAL_BATCH, STEPS = 32, 6
LOSS_ATOL, AUC_ATOL = 1e-4, 1e-3
CPU_TYPES = ["table_wise", "row_wise", "column_wise"]


def _batch(data_dir: Path, start: int, stop: int):
    table = pq.read_table(Path(data_dir) / SAMPLES_DIR / "train")
    columns = {name: table[name].to_numpy()[start:stop] for name in ("user", "pos", "item", "category", "label")}
    return make_batch(columns, open_events(data_dir), history_length=8, history_categories=False)


def _train(trainer: Trainer, data_dir: Path, rank: int, world_size: int) -> Dict[str, object]:
    half = GLOBAL_BATCH // world_size
    losses: List[float] = []
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * half
        loss = trainer.train_step(_batch(data_dir, start, start + half))
        mean = torch.tensor([float(loss)], dtype=torch.float64)
        dist.all_reduce(mean)
        losses.append(float(mean) / world_size)
    dense = torch.cat([p.detach().flatten() for p in trainer.dense_params])
    return {"losses": losses, "auc": trainer.evaluate()["auc"], "dense": dense}


def _sharded_runs(data_dir: Path, out: Path, init: Path) -> Dict[str, Dict[str, object]]:
    results = {}
    with distributed("cpu") as env:
        for kind in CPU_TYPES:
            trainer = Trainer(tiny_config(data_dir, out / kind, f"sharding.default={kind}"), env)
            Checkpointer.load(init, trainer.model)
            results[kind] = _train(trainer, data_dir, env.rank, env.world_size)
    return results


def test_two_rank_sharded_training_equals_unsharded_reference(tmp_path):
    data_dir = prepare_tiny_data(tmp_path / "tiny")
    with distributed("cpu") as env:
        reference_trainer = Trainer(tiny_config(data_dir, tmp_path / "reference"), env, embedding_backend="plain")
        dcp.save({"model": reference_trainer.model.state_dict()}, checkpoint_id=str(tmp_path / "init"))
        reference = _train(reference_trainer, data_dir, rank=0, world_size=1)
    assert reference["losses"][-1] < reference["losses"][0]

    ranks = run_ranks(2, _sharded_runs, data_dir, tmp_path / "sharded", tmp_path / "init")
    sharded = ranks[0]
    assert list(sharded) == CPU_TYPES
    for kind, result in sharded.items():
        torch.testing.assert_close(ranks[1][kind]["dense"], result["dense"], rtol=0, atol=0, msg=kind)
        np.testing.assert_allclose(result["losses"], reference["losses"], atol=LOSS_ATOL, rtol=0, err_msg=kind)
        assert abs(result["auc"] - reference["auc"]) <= AUC_ATOL, kind


def test_sharding_type_that_cannot_run_on_cpu_names_the_alternatives():
    assert supported_sharding_types(torch.device("cpu")) == CPU_TYPES
    with pytest.raises(UserError) as error:
        table_sharding_types(ShardingConfig(tables={"item": "data_parallel"}), ["user", "item", "category"], torch.device("cpu"))
    assert str(error.value) == (
        "sharding type data_parallel (table item) cannot run on cpu: the CPU data-parallel lookup of a shared "
        "non-pooled table fails in torchrec 1.8; use one of ['table_wise', 'row_wise', 'column_wise']"
    )


def test_unknown_sharding_type_and_table_are_user_errors():
    tables, cpu = ["user", "item", "category"], torch.device("cpu")
    with pytest.raises(UserError, match=r"^sharding.default='grid' is not one of: table_wise, row_wise, column_wise, data_parallel$"):
        table_sharding_types(ShardingConfig(default="grid"), tables, cpu)
    with pytest.raises(UserError, match=r"^sharding.tables.item='rows' is not one of: table_wise, row_wise, column_wise, data_parallel$"):
        table_sharding_types(ShardingConfig(tables={"item": "rows"}), tables, cpu)
    with pytest.raises(UserError, match=r"sharding.tables names unknown tables \['items'\]"):
        table_sharding_types(ShardingConfig(tables={"items": "row_wise"}), tables, cpu)
