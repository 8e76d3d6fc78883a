"""AutoInt (Song et al. 2019), the static-only attention baseline of Table 2.

The fields user, item and category are three tokens; each interacting layer is multi-head
self-attention with a projected residual and ReLU, out = ReLU(MHA(E) + W_res E). The last layer's
tokens, flattened, give the logit through one linear layer, as in AutoInt without its "+" DNN.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import embed
from mdaf_dist.models.output import ModelOutput


class InteractingLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.residual = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return torch.relu(attended + self.residual(tokens))


class AutoInt(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        dim = cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.Sequential(*(InteractingLayer(dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_attention_layers)))
        self.out = nn.Linear(3 * dim, 1)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        e = embed(self.embeddings, features, self.history_length)
        tokens = self.layers(self.dropout(torch.stack([e.user, e.item, e.category], dim=1)))
        return ModelOutput(logits=self.out(tokens.flatten(1)).squeeze(-1))
