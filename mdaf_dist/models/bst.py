"""BST, Behavior Sequence Transformer (Chen et al. 2019), the sequential baseline of Table 2.

The target item is appended to the history as the newest step; learned positional embeddings are
added (BST uses the time since each click; the batch carries no timestamps, so the position is
the recency rank: 0 for the target, 1 for the newest click, ...); a transformer encoder with a
key-padding mask runs over the sequence; the output at the target step, concatenated with the user
and target-category embeddings (BST's "other features"), goes through the MLP to a logit.
Recency ranks make the positions of real steps independent of how much padding precedes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import embed
from mdaf_dist.models.output import ModelOutput, mlp_head


class BST(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        dim = cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.positions = nn.Embedding(cfg.history_length + 1, dim)
        layer = nn.TransformerEncoderLayer(
            dim, cfg.num_heads, dim_feedforward=4 * dim, dropout=cfg.dropout,
            activation=F.leaky_relu, batch_first=True,  # BST's FFN uses LeakyReLU
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_attention_layers, enable_nested_tensor=False)
        self.deep = mlp_head(3 * dim, cfg.mlp_hidden, cfg.dropout)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        e = embed(self.embeddings, features, self.history_length)
        sequence, mask = e.history_with_target()  # [B, L + 1, D], [B, L + 1]
        length = sequence.shape[1]
        recency = torch.arange(length - 1, -1, -1, device=sequence.device).expand_as(mask)
        # padded steps get rank 0: they are masked out as keys, and the table needs no row for them
        sequence = sequence + self.positions(torch.where(mask, recency, torch.zeros_like(recency)))
        h_seq = self.encoder(sequence, src_key_padding_mask=~mask)[:, -1]
        logits = self.deep(torch.cat([h_seq, e.user, e.category], dim=-1)).squeeze(-1)
        return ModelOutput(logits=logits, h_seq=h_seq)
