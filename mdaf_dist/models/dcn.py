"""Cross networks for the static branch: the paper's "DCNv3" and the published DCNv3.

MDAF_paper.md (3.3, 4.3) writes LCN as x_{l+1} = x_l + x_0 * (W_l x_l + b_l) and ECN as
x_{l+1} = x_l + x_0 * ReLU(W_l x_l). Both multiply by x_0, so each layer raises the interaction
order by one: this is DCNv2's cross layer (LCN) and a ReLU variant of it (ECN), not the published
DCNv3 (Li et al. 2024), whose ECN multiplies by x_l so the order doubles per layer. Both are here:
`PaperDCNv3` is MDAF's default, `OfficialDCNv3` the published layers (`static_branch: dcnv3_official`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet


class ExponentialCrossNetwork(nn.Module):
    """The paper's ECN: x_{l+1} = x_l + x_0 * ReLU(W_l x_l). The paper's formula has no bias term,
    so the layers have none (its LCN formula has one: the difference is kept as written)."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x + x0 * torch.relu(layer(x))
        return x


class PaperDCNv3(nn.Module):
    """MDAF's static branch (4.3): LCN and ECN side by side on x_0 (3D), then
    h_static = LayerNorm(Linear([x_lcn; x_ecn])) in R^D. The paper writes the LayerNorm around the
    concatenation and then says a linear projection reduces it to D; the projection comes first
    here so that the LayerNorm normalises the D-dim vector that enters the fusion."""

    def __init__(self, in_dim: int, out_dim: int, lcn_layers: int, ecn_layers: int):
        super().__init__()
        # torchrec's CrossNet is exactly the paper's LCN: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l
        self.lcn = CrossNet(in_dim, lcn_layers)
        self.ecn = ExponentialCrossNetwork(in_dim, ecn_layers)
        self.project = nn.Linear(2 * in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.norm(self.project(torch.cat([self.lcn(x0), self.ecn(x0)], dim=-1)))


class SelfMaskCross(nn.Module):
    """One published DCNv3 layer: c = W x_l + b with W of rank d/2, Mask(c) = c * max(0, LN(c)),
    x_{l+1} = multiplier * [c; Mask(c)] + x_l (multiplier x_0 in LCN, x_l in ECN)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the published DCNv3 halves the width; input width {dim} is odd")
        self.linear = nn.Linear(dim, dim // 2)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        c = self.linear(x)
        return multiplier * torch.cat([c, c * torch.relu(self.norm(c))], dim=-1) + x


class OfficialDCNv3(nn.Module):
    """Published DCNv3 (Li et al. 2024): LCN multiplies by x_0 (linear order growth), ECN by x_l
    (order 2^l). The published model turns each tower into a logit and averages the two logits;
    here both towers must give one D-dim h_static for the fusion, so each is projected to D and the
    two are averaged before the shared head (the same thing when the head is linear).
    Tri-BCE (extra BCE terms on each tower's own logit, weighted by how much worse that tower is)
    is left out: MDAF's towers have no logits of their own, and adding auxiliary losses would make
    the comparison with the paper's single smoothed BCE objective unfair."""

    def __init__(self, in_dim: int, out_dim: int, lcn_layers: int, ecn_layers: int):
        super().__init__()
        self.lcn = nn.ModuleList(SelfMaskCross(in_dim) for _ in range(lcn_layers))
        self.ecn = nn.ModuleList(SelfMaskCross(in_dim) for _ in range(ecn_layers))
        self.project_lcn = nn.Linear(in_dim, out_dim)
        self.project_ecn = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x_lcn = x0
        for layer in self.lcn:
            x_lcn = layer(x_lcn, x0)
        x_ecn = x0
        for layer in self.ecn:
            x_ecn = layer(x_ecn, x_ecn)
        return self.norm(0.5 * (self.project_lcn(x_lcn) + self.project_ecn(x_ecn)))
