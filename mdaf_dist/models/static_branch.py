"""The static branch of MDAF: x_0 = [e_u; e_v; e_c] (3D) -> h_static in R^D, by name."""

from __future__ import annotations

from typing import Optional, get_args

from torch import nn

from mdaf_dist.config import ModelConfig, StaticBranch
from mdaf_dist.models.dcn import OfficialDCNv3, PaperDCNv3
from mdaf_dist.models.dlf import DLFStaticBranch
from mdaf_dist.models.optfusion import Architecture, OptFusionStatic

# "none" (sequence only) has no module: the registry builds the Mamba4Rec model for it
STATIC_BRANCHES = tuple(b for b in get_args(StaticBranch) if b != "none")


def mlp_static_branch(in_dim: int, out_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    """The "MLP instead of DCNv3" ablation (Table 3): as many ReLU layers of width in_dim as the
    cross network has cross layers, then the same projection + LayerNorm to D."""
    layers = []
    for _ in range(num_layers):
        layers += [nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))


def build_static_branch(cfg: ModelConfig, in_dim: int, out_dim: int, optfusion_architecture: Optional[Architecture] = None) -> nn.Module:
    """`cfg.static_branch` from in_dim to out_dim; `optfusion_architecture`: OptFusion's selection
    to re-train (models/optfusion.py), None while searching."""
    name = cfg.static_branch
    if name == "dcnv3":
        return PaperDCNv3(in_dim, out_dim, cfg.lcn_layers, cfg.ecn_layers)
    if name == "dcnv3_official":
        return OfficialDCNv3(in_dim, out_dim, cfg.lcn_layers, cfg.ecn_layers, batch_norm=cfg.dcnv3_batch_norm, dropout=cfg.dropout)
    if name == "dlf":
        return DLFStaticBranch(in_dim, out_dim, 3, cfg.dlf_layers, cfg.dlf_attention_layers, cfg.dlf_layer_norm)
    if name == "mlp":
        return mlp_static_branch(in_dim, out_dim, max(cfg.lcn_layers, cfg.ecn_layers), cfg.dropout)
    if name == "optfusion":
        return OptFusionStatic(in_dim, out_dim, cfg.optfusion_layers, cfg.dropout, cfg.optfusion_search_lr, optfusion_architecture)
    raise ValueError(f"unknown static_branch {name!r}; expected one of {STATIC_BRANCHES}")
