"""The model of a run, built the same way for training and for scoring, at any world size:
tables on the meta device, sharded by DistributedModelParallel (dense modules in DDP), each
rank's shards filled from train.seed and their global rows.

Training fuses the tables' optimizer into the backward before sharding. Scoring fuses none:
TorchRec's model-parallel kernels always carry an update rule, and unfused it is fbgemm's
stateless SGD, which allocates no state and never runs (scoring has no backward). Nothing here
builds a dense optimizer: that is the trainer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from mdaf_dist.config import Config
from mdaf_dist.data.layout import check_history_length, read_meta
from mdaf_dist.distributed.env import DistEnv
from mdaf_dist.distributed.sharding import shard_model
from mdaf_dist.errors import UserError
from mdaf_dist.models.embeddings import init_tables
from mdaf_dist.models.registry import build_model
from mdaf_dist.train.optim import fuse_embedding_optimizer

EMBEDDING_BACKENDS = ("torchrec", "plain")


def data_vocab(cfg: Config) -> Dict[str, int]:
    """Table rows of cfg.data_dir, its files verified against their checksums and its history
    length checked against the model's."""
    meta = read_meta(cfg.data_dir, checksums=True)
    check_history_length(cfg.data_dir, meta, cfg.model.history_length)
    return {name: int(size) for name, size in meta["vocab"].items()}


def build_distributed_model(
    cfg: Config, vocab: Dict[str, int], env: DistEnv, backend: str = "torchrec", embedding_optimizer: Optional[str] = None, plan_dir: Optional[Path] = None
) -> nn.Module:
    """torchrec: sharded over env's ranks, the tables' optimizer fused unless
    `embedding_optimizer` is None (scoring), the plan saved in `plan_dir` unless None. plain: the
    unsharded reference, in a world of one. Either way the tables start from the same values, and
    so do the dense modules (built from the global generator, which the tables never draw from)."""
    if backend not in EMBEDDING_BACKENDS:
        raise UserError(f"unknown embedding backend {backend!r}; expected one of {EMBEDDING_BACKENDS}")
    if backend == "plain":
        if env.world_size != 1:
            raise UserError("the plain embedding backend is unsharded: run it as a single process")
        return build_model(cfg.model, vocab, embedding_backend="plain", seed=cfg.train.seed).to(env.device)
    model = build_model(cfg.model, vocab, embedding_backend="torchrec", embedding_device=torch.device("meta"), seed=cfg.train.seed)
    tables = model.embeddings.embedding_configs()
    if embedding_optimizer is not None:
        fuse_embedding_optimizer(model.embeddings, embedding_optimizer, cfg.train)
    sharded = shard_model(model, cfg.sharding, env, plan_dir)
    # DMP runs each table's init_fn on this rank's local shard as if it began at row 0 and
    # column 0: overwrite every shard with its own rows and columns of the whole table
    init_tables(sharded, tables, cfg.train.seed)
    return sharded
