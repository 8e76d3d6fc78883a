"""AutoInt (Song et al. 2019), the static-only attention baseline of Table 2.

The fields user, item and category are three tokens; each interacting layer is AutoInt's
multi-head self-attention as its equations (5-8) and DeepCTR-Torch's InteractingLayer write it:
per head, alpha_{m,k} = softmax_k(<W_Q e_m, W_K e_k>) with the plain inner product (no 1/sqrt(d)
scaling), e~_m = sum_k alpha_{m,k} W_V e_k, the heads concatenated without an output projection,
and out = ReLU(e~ + W_Res e). W_Q, W_K, W_V, W_Res are D x D without biases (4 D^2 parameters a
layer), initialised N(0, 0.05) as in DeepCTR-Torch; the layer has no dropout of its own. The last
layer's tokens, flattened, give the logit through one linear layer, as in AutoInt without its
"+" DNN.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import EmbeddedFeatures, embed
from mdaf_dist.models.output import ModelOutput

INIT_STD = 0.05


class InteractingLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.residual = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        for linear in (self.query, self.key, self.value, self.residual):
            nn.init.normal_(linear.weight, std=INIT_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, F, D] -> [B, F, D]."""
        q, k, v = (linear(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for linear in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, F, F], unscaled
        attended = (weights @ v).transpose(1, 2).flatten(2)  # heads concatenated, [B, F, D]
        return torch.relu(attended + self.residual(tokens))


class AutoInt(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        dim = cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.Sequential(*(InteractingLayer(dim, cfg.autoint_heads) for _ in range(cfg.autoint_layers)))
        self.out = nn.Linear(3 * dim, 1)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self.from_embeddings(embed(self.embeddings, features, self.history_length))

    def from_embeddings(self, e: EmbeddedFeatures) -> ModelOutput:
        """Everything after the table lookup (what a served model runs on looked-up rows)."""
        tokens = self.layers(self.dropout(torch.stack([e.user, e.item, e.category], dim=1)))
        return ModelOutput(logits=self.out(tokens.flatten(1)).squeeze(-1))
