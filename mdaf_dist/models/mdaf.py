"""MDAF (MDAF_paper.md 4): a static cross-network branch and a Mamba4Rec branch, fused per sample.

    x_0      = LayerNorm(Dropout([e_u; e_v; e_c]))                    (4.2)
    h_static = static branch(x_0)                                     (4.3, `static_branch`)
    h_seq    = Mamba4Rec(LayerNorm(Dropout(E_v[hist])))[last step]   (4.4)
    h, g     = fusion(h_static, h_seq)                                (4.5, `fusion`; the token
               fusions also read x_0's fields and the sequence's output at every step)
    logit    = head(Dropout(h)), head D -> D -> 1 with ReLU           (4.6)

Dropout is placed where 5.1.4 lists it: after the embeddings, after the Mamba block and the FFN
(inside the Mamba4Rec layer), and after the fusion. The static-only ablation
(`sequence_branch: none`) is this class with h = h_static; the sequence-only ablation is the
Mamba4Rec model (see registry).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig
from mdaf_dist.models.embeddings import EmbeddedFeatures, embed
from mdaf_dist.models.fusion import build_fusion
from mdaf_dist.models.mamba4rec import SequenceBranch
from mdaf_dist.models.optfusion import selected_architecture, space_architecture
from mdaf_dist.models.output import ModelOutput, prediction_head
from mdaf_dist.models.static_branch import build_static_branch


class MDAF(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Module):
        super().__init__()
        dim = cfg.embedding_dim
        self.embeddings = embeddings
        self.history_length = cfg.history_length
        self.static_dropout = nn.Dropout(cfg.dropout)
        self.static_norm = nn.LayerNorm(3 * dim)
        selection = selected_architecture(cfg) if "optfusion" in (cfg.fusion, cfg.static_branch) else None
        self.static = build_static_branch(cfg, 3 * dim, dim, space_architecture(selection, "static_branch") if cfg.static_branch == "optfusion" else None)
        self.sequence: Optional[SequenceBranch] = SequenceBranch(cfg) if cfg.sequence_branch == "mamba" else None
        # with one branch there is nothing to fuse: h is that branch's representation
        self.fusion: Optional[nn.Module] = (
            build_fusion(cfg, dim, space_architecture(selection, "fusion") if cfg.fusion == "optfusion" else None)
            if self.sequence is not None
            else None
        )
        self.fusion_dropout = nn.Dropout(cfg.dropout)
        # the paper's head is D -> D -> 1; concat fusion hands it 2D inputs, the hidden width stays D
        self.head = prediction_head(self.fusion.out_dim if self.fusion is not None else dim, dim)

    def forward(self, features: KeyedJaggedTensor) -> ModelOutput:
        return self.from_embeddings(embed(self.embeddings, features, self.history_length))

    def from_embeddings(self, e: EmbeddedFeatures) -> ModelOutput:
        """Everything after the table lookup (what a served model runs on looked-up rows)."""
        x0 = self.static_norm(self.static_dropout(torch.cat([e.user, e.item, e.category], dim=-1)))
        h_static = self.static(x0)
        if self.sequence is None:
            h, gate, h_seq = h_static, None, None
        elif getattr(self.fusion, "takes_tokens", False):
            seq_tokens = self.sequence(e.history, e.history_mask, all_steps=True)
            h_seq = seq_tokens[:, -1]
            static_tokens = torch.cat([x0.unflatten(-1, (3, -1)), h_static.unsqueeze(1)], dim=1)
            h, gate = self.fusion(h_static, h_seq, static_tokens=static_tokens, seq_tokens=seq_tokens, seq_mask=e.history_mask)
        else:
            h_seq = self.sequence(e.history, e.history_mask)
            h, gate = self.fusion(h_static, h_seq)
        logits = self.head(self.fusion_dropout(h)).squeeze(-1)
        return ModelOutput(logits=logits, gate=gate, h_static=h_static, h_seq=h_seq)
