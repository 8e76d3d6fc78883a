"""Optimizers (MDAF_paper.md 5.1.4): AdamW with linear warmup for the dense modules, and a
row-sparse optimizer for the embedding tables.

With TorchRec the tables' optimizer is fused into the backward (`apply_optimizer_in_backward`
before sharding): each table's rows are updated inside the fbgemm kernel as their gradients are
produced, and no dense gradient of a table is ever materialised. The fbgemm CPU kernels
implement only EXACT_SGD, EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD, so "auto" means Adam on CUDA
and row-wise Adagrad on CPU. The plain-PyTorch embedding backend (the unsharded reference) runs
the same optimizer class as an ordinary optimizer stepped right after the backward, which is
the same update.

The tables follow the paper's recipe where the fused kernels can: their learning rate is
`train.lr` unless `train.embedding_lr` is set, and the warmup schedules it with the dense one
(the fused optimizer's param group is one of the combined optimizer's; torchrec hands its lr to
the kernel on `zero_grad()`, which the trainer calls before each backward). Two documented
departures from the paper's single AdamW remain: weight decay and gradient clipping apply to the
dense parameters only. fbgemm's kernels accept a weight decay (L2 or decoupled for row-wise
Adagrad), but they apply it only to the rows a batch touches, which is not AdamW's decay of every
parameter at every step, and clipping by the global norm needs every table gradient, which the
fused update never materialises. Table A1's weight-decay axis therefore moves the dense part only.
Of the dense parameters, those marked `_no_weight_decay` (the Mamba block's A_log and D, as
mamba_ssm marks them) are not decayed either.
OptFusion's architecture parameters (alpha, beta; models/optfusion.py) are not trained by AdamW:
as in the authors' code they have an Adam of their own, stepped on the same batches (no weight
decay, no clipping; the warmup schedules it with the rest).
Gradients of sharded tables are the sum of every rank's local-mean loss gradient (DDP averages
dense gradients instead); Adam and (row-wise) Adagrad are invariant to that scale up to eps.
"""

from __future__ import annotations

from typing import Dict, List, Tuple, Type

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from mdaf_dist.config import TrainConfig
from mdaf_dist.errors import UserError
from mdaf_dist.models import embedding_backward
from mdaf_dist.models.optfusion import ARCHITECTURE_LR

# the choices of config.EmbeddingOptimizer but "auto"
EMBEDDING_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
# what the fbgemm CPU kernels implement (split_table_batched_embeddings_ops_training)
CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
EMBEDDINGS_PREFIX = "embeddings."


def resolve_embedding_optimizer(name: str, device: torch.device) -> str:
    if name == "auto":
        return "adam" if device.type == "cuda" else "rowwise_adagrad"
    if device.type == "cpu" and name not in CPU_EMBEDDING_OPTIMIZERS:
        raise UserError(f"train.embedding_optimizer={name} has no fbgemm CPU kernel; use one of {list(CPU_EMBEDDING_OPTIMIZERS)}")
    return name


def embedding_lr(cfg: TrainConfig) -> float:
    """The tables' learning rate: `train.embedding_lr`, or `train.lr` when it is unset."""
    return cfg.lr if cfg.embedding_lr is None else cfg.embedding_lr


def embedding_optimizer_spec(name: str, cfg: TrainConfig) -> Tuple[Type[torch.optim.Optimizer], Dict[str, float]]:
    """Class and arguments of a resolved embedding optimizer."""
    kwargs: Dict[str, float] = {"lr": embedding_lr(cfg)}
    if name != "sgd":
        kwargs["eps"] = cfg.embedding_eps
    return EMBEDDING_OPTIMIZERS[name], kwargs


def fuse_embedding_optimizer(embeddings: nn.Module, name: str, cfg: TrainConfig) -> None:
    """Mark the tables' parameters for the fused in-backward update; call before sharding. On CPU,
    row-wise Adagrad's non-pooled update then runs our kernel (models/embedding_backward.py)."""
    embedding_backward.install()
    optimizer_class, kwargs = embedding_optimizer_spec(name, cfg)
    apply_optimizer_in_backward(optimizer_class, embeddings.parameters(), kwargs)


def _trained_by_backprop(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every parameter but the tables (fused or plain)."""
    return {
        name: p
        for name, p in in_backward_optimizer_filter(model.named_parameters())
        if not name.startswith(EMBEDDINGS_PREFIX) and p.requires_grad
    }


def dense_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters trained by AdamW: everything but the tables and OptFusion's architecture."""
    return {name: p for name, p in _trained_by_backprop(model).items() if not hasattr(p, ARCHITECTURE_LR)}


def architecture_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """OptFusion's alpha and beta while it searches (empty otherwise)."""
    return {name: p for name, p in _trained_by_backprop(model).items() if hasattr(p, ARCHITECTURE_LR)}


def adamw(params: List[torch.Tensor], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter but those marked `_no_weight_decay`."""
    decayed = [p for p in params if not getattr(p, "_no_weight_decay", False)]
    exempt = [p for p in params if getattr(p, "_no_weight_decay", False)]
    groups = [{"params": decayed}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_optimizer(model: nn.Module, cfg: TrainConfig, embedding_optimizer: str) -> KeyedOptimizer:
    """One keyed optimizer over the whole model (its state_dict is what a checkpoint stores):
    AdamW over the dense parameters, plus the tables' optimizer, fused (`model.fused_optimizer`
    of a DistributedModelParallel) or, for plain tables, an ordinary one."""
    dense = KeyedOptimizerWrapper(
        dense_parameters(model), lambda params: adamw(params, cfg)
    )
    architecture = architecture_parameters(model)
    searched = [("architecture", KeyedOptimizerWrapper(architecture, architecture_adam))] if architecture else []
    fused = getattr(model, "fused_optimizer", None)
    if fused is not None:
        return CombinedOptimizer([("dense", dense), *searched, ("embeddings", fused)])
    plain_tables = {name: p for name, p in model.named_parameters() if name.startswith(EMBEDDINGS_PREFIX)}
    optimizer_class, kwargs = embedding_optimizer_spec(embedding_optimizer, cfg)
    tables = KeyedOptimizerWrapper(plain_tables, lambda params: optimizer_class(params, **kwargs))
    return CombinedOptimizer([("dense", dense), *searched, ("embeddings", tables)])


def architecture_adam(params: List[torch.Tensor]) -> torch.optim.Adam:
    """OptFusion's architecture optimizer, at the learning rate its parameters carry."""
    return torch.optim.Adam(params, lr=getattr(params[0], ARCHITECTURE_LR))


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_epochs * steps_per_epoch))


def linear_warmup(optimizer: KeyedOptimizer, steps: int) -> LambdaLR:
    """Every lr (dense and tables) rises linearly from lr/steps to lr over `steps` steps, then
    stays (paper: 2 epochs of warmup, no decay)."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0)

