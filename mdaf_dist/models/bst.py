"""BST, Behavior Sequence Transformer (Chen et al. 2019), the sequential baseline of Table 2.

The target item is appended to the history as the newest step; each step's item embedding is
concatenated with a learned positional embedding of the same width D, as BST concatenates its
positional feature (BST uses the time since each click; the batch carries no timestamps, so the
position is the recency rank: 0 for the target, 1 for the newest click, ...), so the transformer
is 2D wide. `BSTBlock`s with a key-padding mask run over the sequence; the output at the target
step, concatenated with the user and target-category embeddings (BST's "other features"), goes
through the MLP to a logit. Recency ranks make the positions of real steps independent of how much
padding precedes them.

Blocks and heads are `model.bst_blocks` x `model.bst_heads`, 2 x 2 by default; the original BST
found 1 block best and used 8 heads (its Table 3 and 4.1).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import EmbeddedFeatures, embed
from mdaf_dist.models.output import ModelOutput, mlp_head


class BSTBlock(nn.Module):
    """BST's transformer layer (3.2): S' = LayerNorm(S + Dropout(MH(S))),
    F = LayerNorm(S' + Dropout(LeakyReLU(S' W1 + b1) W2 + b2)); the FFN keeps the model width
    (W1, W2 are d x d) and has no dropout inside, and the attention weights are not dropped out.
    MH is multi-head scaled dot-product attention with an output projection W^O."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x [B, L, d], padding [B, L] (True on padded steps, masked out as keys)."""
        attended, _ = self.attention(x, x, x, key_padding_mask=padding, need_weights=False)
        x = self.attention_norm(x + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class BST(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        dim = cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.positions = nn.Embedding(cfg.history_length + 1, dim)
        self.blocks = nn.ModuleList(BSTBlock(2 * dim, cfg.bst_heads, cfg.dropout) for _ in range(cfg.bst_blocks))
        self.deep = mlp_head(4 * dim, cfg.mlp_hidden, cfg.dropout)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self.from_embeddings(embed(self.embeddings, features, self.history_length))

    def from_embeddings(self, e: EmbeddedFeatures) -> ModelOutput:
        """Everything after the table lookup (what a served model runs on looked-up rows)."""
        sequence, mask = e.history_with_target()  # [B, L + 1, D], [B, L + 1]
        length = sequence.shape[1]
        recency = torch.arange(length - 1, -1, -1, device=sequence.device).expand_as(mask)
        # padded steps get rank 0: they are masked out as keys, and the table needs no row for them
        positions = self.positions(torch.where(mask, recency, torch.zeros_like(recency)))
        x = torch.cat([sequence, positions], dim=-1)  # [B, L + 1, 2D]
        for block in self.blocks:
            x = block(x, ~mask)
        h_seq = x[:, -1]
        logits = self.deep(torch.cat([h_seq, e.user, e.category], dim=-1)).squeeze(-1)
        return ModelOutput(logits=logits, h_seq=h_seq)
