"""`build_model`: one place that turns a ModelConfig and vocabulary sizes into a model."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import nn

from mdaf_dist.config import ConfigError, ModelConfig
from mdaf_dist.models.autoint import AutoInt
from mdaf_dist.models.bst import BST
from mdaf_dist.models.dcnv2 import DCNv2
from mdaf_dist.models.dlf import DLF
from mdaf_dist.models.embeddings import build_embeddings, table_configs
from mdaf_dist.models.mamba4rec import Mamba4Rec
from mdaf_dist.models.mdaf import MDAF


def _mdaf(cfg: ModelConfig, embeddings: nn.Module) -> nn.Module:
    if cfg.static_branch == "none":
        # sequence only: the paper's ablation row equals its Mamba4Rec baseline (0.5716 in Tables 2 and 3)
        return Mamba4Rec(cfg, embeddings)
    return MDAF(cfg, embeddings)


# one entry per choice of config.ModelName
MODELS: Dict[str, Callable[[ModelConfig, nn.Module], nn.Module]] = {
    "mdaf": _mdaf,
    "autoint": AutoInt,
    "dcnv2": DCNv2,
    "bst": BST,
    "mamba4rec": Mamba4Rec,
    "dlf": DLF,
}


def check_model_config(cfg: ModelConfig) -> None:
    """The settings of `model.*` that must agree with each other, so that a mistake is one line
    naming the setting (ConfigError), not a traceback from deep in a constructor (the names are
    checked against their Literal choices where the config is loaded)."""
    if cfg.static_branch == "none" and cfg.sequence_branch == "none":
        raise ConfigError("model.static_branch and model.sequence_branch cannot both be 'none'")
    if not 0.0 <= cfg.fixed_gate <= 1.0:
        raise ConfigError(f"model.fixed_gate={cfg.fixed_gate!r} must lie in [0, 1]")
    for key in ("mamba_layers", "optfusion_layers", "autoint_layers", "autoint_heads", "bst_blocks", "bst_heads", "dlf_layers", "dlf_attention_layers"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}={getattr(cfg, key)!r} must be at least 1")
    if cfg.gate_hidden < 0:
        raise ConfigError(f"model.gate_hidden={cfg.gate_hidden!r} must be 0 (D) or a width")
    # attention splits its width evenly over the heads (BST's width is 2D: item + position)
    for model, key, width in (("autoint", "autoint_heads", cfg.embedding_dim), ("bst", "bst_heads", 2 * cfg.embedding_dim)):
        if cfg.name == model and width % getattr(cfg, key):
            raise ConfigError(f"model.{key}={getattr(cfg, key)} does not divide the attention width {width}")
    if cfg.fusion in ("attention", "cross_attention") and cfg.embedding_dim % cfg.num_heads:
        raise ConfigError(f"model.num_heads={cfg.num_heads} does not divide the attention width {cfg.embedding_dim}")


def build_model(
    cfg: ModelConfig,
    vocab: Dict[str, int],
    *,
    embedding_backend: str = "torchrec",
    embedding_device: Optional[torch.device] = None,
    seed: int = 0,
) -> nn.Module:
    """The model named by cfg.name, with its tables in `model.embeddings` (built on
    `embedding_device`, e.g. meta for sharding; the dense modules are built on the CPU). The
    tables' initial values come from `seed` (see embeddings.init_table_rows), the dense modules'
    from the global generator."""
    check_model_config(cfg)
    tables = table_configs(vocab, cfg.embedding_dim, seed=seed)
    embeddings = build_embeddings(tables, backend=embedding_backend, device=embedding_device)
    return MODELS[cfg.name](cfg, embeddings)
