"""`build_model`: one place that turns a ModelConfig and vocabulary sizes into a model."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.autoint import AutoInt
from mdaf_dist.models.bst import BST
from mdaf_dist.models.dcnv2 import DCNv2
from mdaf_dist.models.embeddings import build_embeddings, table_configs
from mdaf_dist.models.mamba4rec import Mamba4Rec
from mdaf_dist.models.mdaf import MDAF
from mdaf_dist.models.static_branch import STATIC_BRANCHES


def _mdaf(cfg: ModelConfig, embeddings: nn.Module) -> nn.Module:
    if cfg.static_branch == "none":
        if cfg.sequence_branch == "none":
            raise ValueError("static_branch and sequence_branch cannot both be 'none'")
        # sequence only: the paper's ablation row equals its Mamba4Rec baseline (0.5716 in Tables 2 and 3)
        return Mamba4Rec(cfg, embeddings)
    if cfg.static_branch not in STATIC_BRANCHES:
        raise ValueError(f"unknown static_branch {cfg.static_branch!r}; expected one of {STATIC_BRANCHES + ('none',)}")
    return MDAF(cfg, embeddings)


MODELS: Dict[str, Callable[[ModelConfig, nn.Module], nn.Module]] = {
    "mdaf": _mdaf,
    "autoint": AutoInt,
    "dcnv2": DCNv2,
    "bst": BST,
    "mamba4rec": Mamba4Rec,
}


def build_model(
    cfg: ModelConfig,
    vocab: Dict[str, int],
    *,
    embedding_backend: str = "torchrec",
    embedding_device: Optional[torch.device] = None,
) -> nn.Module:
    """The model named by cfg.name, with its tables in `model.embeddings` (built on
    `embedding_device`, e.g. meta for sharding; the dense modules are built on the CPU)."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; expected one of {sorted(MODELS)}")
    embeddings = build_embeddings(table_configs(vocab, cfg.embedding_dim), backend=embedding_backend, device=embedding_device)
    return MODELS[cfg.name](cfg, embeddings)
