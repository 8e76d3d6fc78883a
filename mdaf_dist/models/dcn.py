"""Cross networks for the static branch: the paper's "DCNv3" and the published DCNv3.

MDAF_paper.md (3.3, 4.3) writes LCN as x_{l+1} = x_l + x_0 * (W_l x_l + b_l) and ECN as
x_{l+1} = x_l + x_0 * ReLU(W_l x_l). Both multiply by x_0, so each layer raises the interaction
order by one: this is DCNv2's cross layer (LCN) and a ReLU variant of it (ECN), not the published
DCNv3 (Li et al. 2024), whose ECN multiplies by x_l so the order doubles per layer. Both are here:
`PaperDCNv3` is MDAF's default (the paper's formulas are what MDAF deliberately writes), and
`OfficialDCNv3` the published layers as their code lays them out (`static_branch: dcnv3_official`).
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


def published_order(x0: torch.Tensor, num_fields: int) -> torch.Tensor:
    """[e_1; ...; e_F] -> [first halves of e_1..e_F; second halves of e_1..e_F], the order in which
    the published DCNv3 feeds its fields (MultiHeadFeatureEmbedding with one head), so that the
    first half of every field is multiplied by c and the second half by Mask(c)."""
    return x0.unflatten(-1, (num_fields, 2, -1)).transpose(-3, -2).flatten(-3)


class SelfMaskCross(nn.Module):
    """One published DCNv3 layer: c = W x_l with W in R^{d/2 x d} and no bias (BatchNorm on c when
    `batch_norm`), Mask(c) = c * max(0, LN(c)), and
    x_{l+1} = Dropout(multiplier * ([c; Mask(c)] + b) + x_l) with one full-width bias b in R^d;
    the multiplier is x_0 in LCN, x_l in ECN. Initialised as published: W xavier-normal, b
    uniform in [0, 1) (`nn.init.uniform_`)."""

    def __init__(self, dim: int, batch_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(dim, dim // 2, bias=False)
        self.bias = nn.Parameter(torch.empty(dim))
        # BatchNorm1d over one channel, as the published layer with one head: one mean and variance
        # over the batch and all d/2 entries
        self.batch_norm = nn.BatchNorm1d(1) if batch_norm else nn.Identity()
        self.norm = nn.LayerNorm(dim // 2)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_normal_(self.linear.weight)
        nn.init.uniform_(self.bias)

    def forward(self, x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
        c = self.batch_norm(self.linear(x).unsqueeze(1)).squeeze(1)
        return self.dropout(multiplier * (torch.cat([c, c * torch.relu(self.norm(c))], dim=-1) + self.bias) + x)


class OfficialDCNv3(nn.Module):
    """Published DCNv3 (Li et al. 2024; its code, FuxiCTR's DCNv3 with one head): the fields enter
    in the published order (`published_order`); LCN multiplies by x_0 (linear order growth), ECN
    by x_l (order 2^l); dropout after every cross layer (the published deep/shallow dropouts are
    both `model.dropout` here); BatchNorm by `model.dcnv3_batch_norm`; every Linear
    xavier-normal with zero bias, as the published model's reset_parameters.

    One documented departure: the published model turns each tower into a logit (Linear d -> 1)
    and averages the two logits; MDAF's fusion needs one D-dim h_static, so each tower is
    projected to D and h_static = LayerNorm((P_lcn x_lcn + P_ecn x_ecn) / 2). Because of the
    LayerNorm (and the non-linear head after the fusion) this is not the published logit average.
    Tri-BCE (extra BCE terms on each tower's own logit, weighted by how much worse that tower is)
    is left out: MDAF's towers have no logits of their own, and adding auxiliary losses would make
    the comparison with the paper's single smoothed BCE objective unfair."""

    def __init__(self, in_dim: int, out_dim: int, lcn_layers: int, ecn_layers: int,
                 num_fields: int = 3, batch_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        if in_dim % (2 * num_fields):
            raise ValueError(f"the published DCNv3 halves every field's embedding; embedding width {in_dim // num_fields} is odd")
        self.num_fields = num_fields
        self.lcn = nn.ModuleList(SelfMaskCross(in_dim, batch_norm, dropout) for _ in range(lcn_layers))
        self.ecn = nn.ModuleList(SelfMaskCross(in_dim, batch_norm, dropout) for _ in range(ecn_layers))
        self.project_lcn = nn.Linear(in_dim, out_dim)
        self.project_ecn = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        for project in (self.project_lcn, self.project_ecn):
            nn.init.xavier_normal_(project.weight)
            nn.init.zeros_(project.bias)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x0 = published_order(x0, self.num_fields)
        x_lcn = x0
        for layer in self.lcn:
            x_lcn = layer(x_lcn, x0)
        x_ecn = x0
        for layer in self.ecn:
            x_ecn = layer(x_ecn, x_ecn)
        return self.norm(0.5 * (self.project_lcn(x_lcn) + self.project_ecn(x_ecn)))
