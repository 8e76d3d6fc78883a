"""The static branch of MDAF: x_0 = [e_u; e_v; e_c] (3D) -> h_static in R^D, by name."""

from __future__ import annotations

from typing import get_args

from torch import nn

from mdaf_dist.config import StaticBranch
from mdaf_dist.models.dcn import OfficialDCNv3, PaperDCNv3

# "none" (sequence only) has no module: the registry builds the Mamba4Rec model for it
STATIC_BRANCHES = tuple(b for b in get_args(StaticBranch) if b != "none")


def mlp_static_branch(in_dim: int, out_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    """The "MLP instead of DCNv3" ablation (Table 3): as many ReLU layers of width in_dim as the
    cross network has cross layers, then the same projection + LayerNorm to D."""
    layers = []
    for _ in range(num_layers):
        layers += [nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))


def build_static_branch(name: str, in_dim: int, out_dim: int, lcn_layers: int, ecn_layers: int, dropout: float,
                        batch_norm: bool = False) -> nn.Module:
    """`batch_norm`: the published DCNv3's BatchNorm switch (dcnv3_official only)."""
    if name == "dcnv3":
        return PaperDCNv3(in_dim, out_dim, lcn_layers, ecn_layers)
    if name == "dcnv3_official":
        return OfficialDCNv3(in_dim, out_dim, lcn_layers, ecn_layers, batch_norm=batch_norm, dropout=dropout)
    if name == "mlp":
        return mlp_static_branch(in_dim, out_dim, max(lcn_layers, ecn_layers), dropout)
    raise ValueError(f"unknown static_branch {name!r}; expected one of {STATIC_BRANCHES}")
