"""DCNv2 (Wang et al. 2021), the static-only cross-network baseline of Table 2.

x_0 = [e_u; e_v; e_c] goes through DCN-V2's mixture of low-rank cross experts (the paper calls it
"mixture-of-experts cross layers", 5.1.2; torchrec's `LowRankMixtureCrossNet` is that layer), then
the deep tower stacked on top (DCN-V2's "stacked" structure) and a logit.

Each layer is x_{l+1} = sum_i softmax_i(G(x_l)) E_i(x_l) + x_l with experts
E_i(x_l) = x_0 * (U_i tanh(C_i tanh(V_i^T x_l)) + b) and gates G_i(x_l) = w_i^T x_l: tanh as in
DeepCTR's CrossNetMix, the DCN-Mix reference (DeepCTR-Torch, which the MDAF authors list, has the
same layer; torchrec's default activation is ReLU). U, V, C are xavier-normal and b zero, as in
both; the gates are glorot-uniform as DeepCTR's Keras Dense gates (DeepCTR-Torch keeps PyTorch's
Linear default, a bound 2.4x smaller).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankMixtureCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import EmbeddedFeatures, embed
from mdaf_dist.models.output import ModelOutput, mlp_head


class DCNv2(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        in_dim = 3 * cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.dropout = nn.Dropout(cfg.dropout)
        self.cross = LowRankMixtureCrossNet(
            in_dim, cfg.num_cross_layers, num_experts=cfg.cross_experts, low_rank=cfg.cross_low_rank, activation=torch.tanh
        )
        for gate in self.cross.gates or ():
            nn.init.xavier_uniform_(gate.weight)
        self.deep = mlp_head(in_dim, cfg.mlp_hidden, cfg.dropout)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self.from_embeddings(embed(self.embeddings, features, self.history_length))

    def from_embeddings(self, e: EmbeddedFeatures) -> ModelOutput:
        """Everything after the table lookup (what a served model runs on looked-up rows)."""
        x0 = self.dropout(torch.cat([e.user, e.item, e.category], dim=-1))
        return ModelOutput(logits=self.deep(self.cross(x0)).squeeze(-1))
