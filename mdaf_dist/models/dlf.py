"""DLF (Wang et al. 2025, DLF_paper.md 4): L stacked layers, each a Residual-Aware Low-Order
Interaction network (RLI: low-rank, high-rank and implicit blocks, eqs. 5-7), the Network-Aware
Attention Fusion of the three blocks (NAF, eqs. 10-15) and a gated residual (eq. 9), then the
prediction layer (eq. 16). MDAF's static branch (`model.static_branch=dlf`) and a static-only
baseline (`model.name=dlf`).

How the equations are read (the paper gives the sizes, not the layout):
- E^(l) in R^{R x d} holds R feature tokens of width d (here R = 3: user, item, category; d = D).
  Then eq. 5's E^(1) (E^(l))^T W_LI, with W_LI in R^{R x d}, is well-typed as written: row j is
  sum_i <e_j^(1), e_i^(l)> w_i, the inner-product interactions of eq. 1 between the embeddings
  and the current tokens, aggregated by learned vectors w_i. Eq. 6 is the same with E^(l) in
  place of E^(1) (eq. 3). W_LO, W_CO, W_D, W_Gate (d x d) act on every token.
- eq. 15 concatenates [Z_L; Z_C; Z_D; Att] into a 4d-wide token, but eq. 9 adds it to E^(l), d
  wide: a linear map W_Z in R^{d x 4d} (+ b_Z) brings it back to d. It is the one weight that
  the paper does not list.
- NAF's f_att (eq. 10) is one linear map d -> 3d with bias, shared by the blocks (the paper
  writes it without a block index); sigma in eq. 12 is ReLU, as 4.2 defines it.
- 5.5's "number of attention layers" (best: 2) is read as rounds of eqs. 10-13, the blocks of
  round k+1 being round k's Att^C_M + Att^S_M, each round with its own f_att and W^C_M; eq. 14
  fuses the last round.
- eq. 16's W_out has one weight per entry of the flattened E^(L+1) (R d, not d).
- eq. 9's gate max(eps, W_Gate E) * E and eq. 6 both square the tokens' scale in every layer, and
  the paper names no normalisation: from unit-scale tokens (MDAF's LayerNorm'd x_0, D = 64) eight
  layers overflow float32 by the sixth. `model.dlf_layer_norm` (default on) puts a LayerNorm on
  each layer's output E^(l+1); off, the layer is eqs. 5-15 and 9 exactly.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import EmbeddedFeatures, embed
from mdaf_dist.models.output import ModelOutput

# eq. 9's epsilon: the smallest weight the gate gives the residual
GATE_EPS = 1e-6


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V (eqs. 11 and 13) over [B, T, d] tokens. Keys where `key_mask`
    [B, T_k] is False get no weight; a query without any key (an empty history) gets zeros."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if key_mask is None:
        return torch.softmax(scores, dim=-1) @ value
    keep = key_mask.unsqueeze(-2)
    weights = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1)
    return (weights * keep.any(-1, keepdim=True)) @ value


class NetworkAwareAttention(nn.Module):
    """NAF's block-wise attention (4.3, eqs. 10-14) over n blocks of tokens [B, T_M, d]: each
    block's queries attend to every other block's keys (cross, one softmax per other block,
    eqs. 11-12, W^C_M in R^{d x (n-1)d}) and to its own (self, eq. 13); per token,
    Att = ReLU(W_F [Att^C_1 + Att^S_1; ...; Att^C_n + Att^S_n] + b_F) (eq. 14, W_F in R^{d x nd}),
    which needs the blocks' query counts equal. `last_only` computes only the blocks' last
    tokens' rows (one round)."""

    def __init__(self, dim: int, num_blocks: int, num_layers: int = 1):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(num_layers))  # f_att, eq. 10
        self.cross = nn.ModuleList(
            nn.ModuleList(nn.Linear((num_blocks - 1) * dim, dim) for _ in range(num_blocks)) for _ in range(num_layers)
        )  # W^C_M, b^C_M, eq. 12
        self.fuse = nn.Linear(num_blocks * dim, dim)  # W_F, b_F, eq. 14

    def forward(self, blocks: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
                last_only: bool = False) -> torch.Tensor:
        masks = list(masks) if masks is not None else [None] * len(blocks)
        for f_att, cross in zip(self.qkv, self.cross):
            q, k, v = zip(*(f_att(z).chunk(3, dim=-1) for z in blocks))  # eq. 10
            if last_only:
                q = [query[:, -1:] for query in q]
            attended = []
            for m, w_c in enumerate(cross):
                others = [attend(q[m], k[x], v[x], masks[x]) for x in range(len(blocks)) if x != m]  # eq. 11
                cross_m = torch.relu(w_c(torch.cat(others, dim=-1)))  # eq. 12
                attended.append(cross_m + attend(q[m], k[m], v[m], masks[m]))  # + eq. 13
            blocks = attended
        return torch.relu(self.fuse(torch.cat(blocks, dim=-1)))  # eq. 14


class DLFLayer(nn.Module):
    """One DLF layer: E^(l), E^(1) [B, R, d] -> E^(l+1) [B, R, d] (see the module docstring)."""

    def __init__(self, num_tokens: int, dim: int, attention_layers: int, layer_norm: bool = True):
        super().__init__()
        self.low_in = nn.Parameter(torch.empty(num_tokens, dim))  # W_LI, eq. 5
        self.low_out = nn.Linear(dim, dim)  # W_LO, b_L
        self.high_in = nn.Parameter(torch.empty(num_tokens, dim))  # W_CI, eq. 6
        self.high_out = nn.Linear(dim, dim)  # W_CO, b_C
        self.implicit = nn.Linear(dim, dim)  # W_D, b_D, eq. 7
        self.naf = NetworkAwareAttention(dim, 3, attention_layers)
        self.combine = nn.Linear(4 * dim, dim)  # W_Z, b_Z: eq. 15's concatenation back to d
        self.gate = nn.Linear(dim, dim, bias=False)  # W_Gate, eq. 9
        self.norm = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        nn.init.xavier_uniform_(self.low_in)
        nn.init.xavier_uniform_(self.high_in)

    def interaction_blocks(self, e: torch.Tensor, e1: torch.Tensor) -> List[torch.Tensor]:
        """RLI's three pathways Z_L, Z_C, Z_D, each [B, R, d]."""
        z_low = torch.relu(self.low_out(e1 @ (e.transpose(-1, -2) @ self.low_in)))  # eq. 5
        z_high = torch.relu(self.high_out(e @ (e.transpose(-1, -2) @ self.high_in)))  # eq. 6
        z_implicit = torch.relu(self.implicit(e))  # eq. 7
        return [z_low, z_high, z_implicit]

    def forward(self, e: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:
        z_low, z_high, z_implicit = self.interaction_blocks(e, e1)
        att = self.naf([z_low, z_high, z_implicit])  # eqs. 10-14
        z = self.combine(torch.cat([z_low, z_high, z_implicit, att], dim=-1))  # eq. 15
        return self.norm(z + torch.clamp(self.gate(e), min=GATE_EPS) * e)  # eq. 9


class DLFStack(nn.Module):
    """L DLF layers: E^(1) [B, R, d] -> E^(L+1) [B, R, d]."""

    def __init__(self, num_tokens: int, dim: int, num_layers: int, attention_layers: int, layer_norm: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(DLFLayer(num_tokens, dim, attention_layers, layer_norm) for _ in range(num_layers))

    def forward(self, e1: torch.Tensor) -> torch.Tensor:
        e = e1
        for layer in self.layers:
            e = layer(e, e1)
        return e


class DLFStaticBranch(nn.Module):
    """`model.static_branch=dlf`: x_0 (3D) as R = 3 tokens of width D through the DLF layers; in
    place of eq. 16, the flattened E^(L+1) is projected to D and normalised, as the DCNv3 branch
    ends (h_static = LayerNorm(Linear(.))), so that the fusion receives what it always does."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, num_layers: int, attention_layers: int, layer_norm: bool = True):
        super().__init__()
        self.num_tokens = num_tokens
        self.dlf = DLFStack(num_tokens, in_dim // num_tokens, num_layers, attention_layers, layer_norm)
        self.project = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.norm(self.project(self.dlf(x0.unflatten(-1, (self.num_tokens, -1))).flatten(1)))


class DLF(nn.Module):
    """The static-only DLF baseline: E^(1) = Dropout([e_u; e_v; e_c]) as 3 tokens, L layers, and
    eq. 16's logit W_out^T E^(L+1) + b_out."""

    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        dim = cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.dropout = nn.Dropout(cfg.dropout)
        self.dlf = DLFStack(3, dim, cfg.dlf_layers, cfg.dlf_attention_layers, cfg.dlf_layer_norm)
        self.out = nn.Linear(3 * dim, 1)  # W_out, b_out, eq. 16

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self.from_embeddings(embed(self.embeddings, features, self.history_length))

    def from_embeddings(self, e: EmbeddedFeatures) -> ModelOutput:
        """Everything after the table lookup (what a served model runs on looked-up rows)."""
        e_final = self.dlf(self.dropout(torch.stack([e.user, e.item, e.category], dim=1)))
        return ModelOutput(logits=self.out(e_final.flatten(1)).squeeze(-1))
