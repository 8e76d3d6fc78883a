"""Sharded training (gloo, DistributedModelParallel) on 1 or 2 ranks, with every CPU sharding
type, equals 1-process unsharded training.

Nothing is copied between the runs: the same seed alone must give the same initial tables (each
rank filling its shards from the seed and the global row index) and dense modules. They see the
same global batches: batch k of 32 samples is trained whole on 1 rank and split in halves of 16
across 2 ranks; the step-1 losses are equal to the last bit (the loss is summed exactly in
float64, so the split does not change it). The tables use row-wise Adagrad in all (fused into
the backward when sharded, an ordinary optimizer in the reference); sharded table gradients are
summed over ranks rather than averaged, which row-wise Adagrad's update is invariant to up to eps
(1e-14 here), so later steps agree to rounding. The dense weights must stay identical replicas
on every rank (DDP all-reduces their gradients).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from mdaf_dist.config import ShardingConfig
from mdaf_dist.data.layout import SAMPLES_DIR, open_events
from mdaf_dist.data.loader import make_batch
from mdaf_dist.distributed.env import distributed
from mdaf_dist.distributed.sharding import supported_sharding_types, table_sharding_types
from mdaf_dist.errors import UserError
from mdaf_dist.train.optim import architecture_parameters
from mdaf_dist.train.trainer import Trainer
from tests.distributed import prepare_tiny_data, run_ranks, tiny_config

GLOBAL_BATCH, STEPS = 32, 6
LOSS_ATOL, AUC_ATOL = 1e-6, 1e-6
CPU_TYPES = ["table_wise", "row_wise", "column_wise"]


def _batch(data_dir: Path, start: int, stop: int):
    table = pq.read_table(Path(data_dir) / SAMPLES_DIR / "train")
    columns = {name: table[name].to_numpy()[start:stop] for name in ("user", "pos", "item", "category", "label")}
    return make_batch(columns, open_events(data_dir), history_length=8, history_categories=False)


def _initial_weights(trainer: Trainer) -> Dict[str, object]:
    """Dense parameters, and every table as this rank's shards: (row offset, column offset, values)."""
    state = trainer.model.state_dict()
    tables = {}
    for name in ("user", "item", "category"):
        weight = state[f"embeddings.embeddings.{name}.weight"]
        if hasattr(weight, "local_shards"):
            tables[name] = [(*s.metadata.shard_offsets, s.tensor.detach().clone()) for s in weight.local_shards()]
        else:
            tables[name] = [(0, 0, weight.detach().clone())]
    return {"dense": _dense(trainer), "tables": tables}


def _dense(trainer: Trainer) -> torch.Tensor:
    """Every parameter but the tables, OptFusion's alpha and beta included."""
    return torch.cat([p.detach().flatten() for p in [*trainer.dense_params, *architecture_parameters(trainer.model).values()]])


def _whole_tables(ranks: List[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Each table put together from the shards of every rank."""
    whole = {}
    for name in ranks[0]["tables"]:
        shards = [shard for rank in ranks for shard in rank["tables"][name]]
        rows = max(r + t.shape[0] for r, _, t in shards)
        cols = max(c + t.shape[1] for _, c, t in shards)
        table = torch.full((rows, cols), float("nan"))
        for r, c, t in shards:
            table[r : r + t.shape[0], c : c + t.shape[1]] = t
        whole[name] = table
    return whole


def _train(trainer: Trainer, data_dir: Path, rank: int, world_size: int, steps: int = STEPS) -> Dict[str, object]:
    initial = _initial_weights(trainer)
    half = GLOBAL_BATCH // world_size
    losses: List[float] = []
    for step in range(steps):
        start = step * GLOBAL_BATCH + rank * half
        loss_sum = trainer.train_step(_batch(data_dir, start, start + half)).reshape(1)
        dist.all_reduce(loss_sum)
        losses.append(float(loss_sum) / GLOBAL_BATCH)
    dense = _dense(trainer)
    return {"initial": initial, "losses": losses, "auc": trainer.evaluate()["auc"], "dense": dense}


def _sharded_runs(data_dir: Path, out: Path, model: List[str], kinds: List[str]) -> Dict[str, Dict[str, object]]:
    results = {}
    with distributed("cpu") as env:
        for kind in kinds:
            trainer = Trainer(tiny_config(data_dir, out / kind, f"sharding.default={kind}", *model), env)
            results[kind] = _train(trainer, data_dir, env.rank, env.world_size)
    return results


# the default model on every plan; OptFusion's search (its alpha and beta trained by their own
# Adam, DDP-averaged like the dense gradients) on one
@pytest.mark.parametrize("model, kinds", [([], CPU_TYPES), (["model.fusion=optfusion"], ["row_wise"])], ids=["mdaf", "optfusion"])
def test_sharded_training_on_any_plan_and_world_size_equals_unsharded_reference(tmp_path, model, kinds):
    """No weights are copied between the runs: the same seed must give the same start."""
    data_dir = prepare_tiny_data(tmp_path / "tiny")
    with distributed("cpu") as env:
        reference = _train(Trainer(tiny_config(data_dir, tmp_path / "reference", *model), env, embedding_backend="plain"), data_dir, 0, 1)
        one_rank = _train(Trainer(tiny_config(data_dir, tmp_path / "one_rank", "sharding.default=row_wise", *model), env), data_dir, 0, 1)
    assert reference["losses"][-1] < reference["losses"][0]
    reference_tables = _whole_tables([reference["initial"]])

    ranks = run_ranks(2, _sharded_runs, data_dir, tmp_path / "sharded", model, kinds)
    runs = {"1 rank": [one_rank], **{f"2 ranks {kind}": [rank[kind] for rank in ranks] for kind in kinds}}
    for name, results in runs.items():
        for rank in results:
            torch.testing.assert_close(rank["initial"]["dense"], reference["initial"]["dense"], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(rank["dense"], results[0]["dense"], rtol=0, atol=0, msg=name)
        for table, values in _whole_tables([rank["initial"] for rank in results]).items():
            torch.testing.assert_close(values, reference_tables[table], rtol=0, atol=0, msg=f"{name}: {table}")
        assert results[0]["losses"][0] == reference["losses"][0], name
        np.testing.assert_allclose(results[0]["losses"], reference["losses"], atol=LOSS_ATOL, rtol=0, err_msg=name)
        assert abs(results[0]["auc"] - reference["auc"]) <= AUC_ATOL, name


# the models and fusions from the fusion papers, DLF at 2 of its 8 layers to keep this fast.
# After two steps DLF alone scores the validation samples within about 1e-6 of each other, so the
# summation order of the sharded lookup swaps a few near-tied pairs (each moves AUC by about 3e-5
# here); the losses are the exact check, the AUC allows a handful of such swaps
NEAR_TIES_AUC_ATOL = 3e-4
MODEL_VARIANTS = {
    "dlf": ["model.name=dlf", "model.dlf_layers=2"],
    "static_branch=dlf": ["model.static_branch=dlf", "model.dlf_layers=2"],
    "fusion=cross_attention": ["model.fusion=cross_attention", "model.cross_attention_direction=both"],
    "fusion=dlf_naf": ["model.fusion=dlf_naf"],
}


def _model_variant_runs(data_dir: Path, out: Path) -> Dict[str, Dict[str, object]]:
    with distributed("cpu") as env:
        trainers = {name: Trainer(tiny_config(data_dir, out / name, "sharding.default=row_wise", *overrides), env) for name, overrides in MODEL_VARIANTS.items()}
        return {name: _train(trainer, data_dir, env.rank, env.world_size, steps=2) for name, trainer in trainers.items()}


def test_new_models_sharded_on_two_ranks_equal_unsharded_at_step_1(tmp_path):
    data_dir = prepare_tiny_data(tmp_path / "tiny")
    with distributed("cpu") as env:
        trainers = {name: Trainer(tiny_config(data_dir, tmp_path / "reference" / name, *overrides), env, embedding_backend="plain")
                    for name, overrides in MODEL_VARIANTS.items()}
        references = {name: _train(trainer, data_dir, 0, 1, steps=2) for name, trainer in trainers.items()}
    ranks = run_ranks(2, _model_variant_runs, data_dir, tmp_path / "sharded")
    for name, reference in references.items():
        for rank in ranks:
            torch.testing.assert_close(rank[name]["initial"]["dense"], reference["initial"]["dense"], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(rank[name]["dense"], ranks[0][name]["dense"], rtol=0, atol=0, msg=name)
        assert ranks[0][name]["losses"][0] == reference["losses"][0], name
        np.testing.assert_allclose(ranks[0][name]["losses"], reference["losses"], atol=LOSS_ATOL, rtol=0, err_msg=name)
        assert abs(ranks[0][name]["auc"] - reference["auc"]) <= NEAR_TIES_AUC_ATOL, name


def test_sharding_type_that_cannot_run_on_cpu_names_the_alternatives():
    assert supported_sharding_types(torch.device("cpu")) == CPU_TYPES
    with pytest.raises(UserError) as error:
        table_sharding_types(ShardingConfig(tables={"item": "data_parallel"}), ["user", "item", "category"], torch.device("cpu"))
    assert str(error.value) == (
        "sharding type data_parallel (table item) cannot run on cpu: the CPU data-parallel lookup of a shared "
        "non-pooled table fails in torchrec 1.8; use one of ['table_wise', 'row_wise', 'column_wise']"
    )


def test_unknown_table_is_a_user_error():
    tables, cpu = ["user", "item", "category"], torch.device("cpu")
    with pytest.raises(UserError, match=r"sharding.tables names unknown tables \['items'\]"):
        table_sharding_types(ShardingConfig(tables={"items": "row_wise"}), tables, cpu)
