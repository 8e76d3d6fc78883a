"""Ways to combine h_static and h_seq (both [B, D]) into one representation for the head.

Every fusion is a module with `forward(h_static, h_seq) -> (h, gate)` and an `out_dim`; `gate` is
the per-sample weight of the sequential branch [B] where the fusion has one, else None.
"""

from __future__ import annotations

from typing import Optional, Tuple, get_args

import torch
from torch import nn

from mdaf_dist.config import Fusion

FUSIONS = get_args(Fusion)

Fused = Tuple[torch.Tensor, Optional[torch.Tensor]]


class AdaptiveGate(nn.Module):
    """MDAF's fusion (4.5): g = sigmoid(w_2 . ReLU(W_1 [h_s; h_q] + b_1) + b_2), one scalar per
    sample, h = (1 - g) h_s + g h_q. 2D -> D -> 1: 8,321 parameters at D = 64 (paper: ~8K); the
    authors' repository uses a hidden width of 64 at D = 32 (`hidden`, default D)."""

    def __init__(self, dim: int, hidden: int = 0):
        super().__init__()
        self.out_dim = dim
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor) -> Fused:
        g = torch.sigmoid(self.mlp(torch.cat([h_static, h_seq], dim=-1)))
        return (1 - g) * h_static + g * h_seq, g.squeeze(-1)


class ConcatFusion(nn.Module):
    """"w/o gate" (Table 3): [h_s; h_q] goes to the head, which then takes 2D inputs."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = 2 * dim

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor) -> Fused:
        return torch.cat([h_static, h_seq], dim=-1), None


class FixedGate(nn.Module):
    """"Fixed gate" (Table 3): h = (1 - g) h_s + g h_q with a constant g (0.5 in the paper). The
    constant is reported as the gate so gate statistics stay comparable across variants."""

    def __init__(self, dim: int, gate: float):
        super().__init__()
        if not 0.0 <= gate <= 1.0:
            raise ValueError(f"fixed_gate must lie in [0, 1], got {gate}")
        self.out_dim = dim
        self.gate = gate

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor) -> Fused:
        g = h_static.new_full((h_static.shape[0],), self.gate)
        return (1 - self.gate) * h_static + self.gate * h_seq, g


class AttentionFusion(nn.Module):
    """DLF's network-aware attention fusion (DLF_paper.md 4.3) with its gated residual (eq. 9),
    reduced to MDAF's two branch vectors.

    Each branch is one token. DLF gives each block a self-attention and a cross-attention over the
    other blocks with separate softmaxes; with a single vector per block both softmaxes run over one
    key and are constant, so one multi-head attention over both tokens is used instead: each branch
    attends to itself and to the other with a learned split. The attended tokens are fused as in
    eq. 14, Att = ReLU(W_F [a_s; a_q] + b_F), and eq. 9's gated residual adds
    max(eps, W_gate r) * r with r = (h_s + h_q) / 2, the layer input, so the fusion starts near the
    plain average. About 3.5x the gate's parameters at D = 64 (paper, 5.3: "3x")."""

    def __init__(self, dim: int, num_heads: int, dropout: float, eps: float = 1e-6):
        super().__init__()
        self.out_dim = dim
        self.eps = eps
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.fuse = nn.Linear(2 * dim, dim)
        self.residual_gate = nn.Linear(dim, dim, bias=False)

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor) -> Fused:
        tokens = torch.stack([h_static, h_seq], dim=1)  # [B, 2, D]
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        fused = torch.relu(self.fuse(attended.flatten(1)))
        residual = 0.5 * (h_static + h_seq)
        return fused + torch.clamp(self.residual_gate(residual), min=self.eps) * residual, None


def build_fusion(name: str, dim: int, fixed_gate: float, num_heads: int, dropout: float, gate_hidden: int = 0) -> nn.Module:
    if name == "gate":
        return AdaptiveGate(dim, gate_hidden)
    if name == "concat":
        return ConcatFusion(dim)
    if name == "fixed":
        return FixedGate(dim, fixed_gate)
    if name == "attention":
        return AttentionFusion(dim, num_heads, dropout)
    raise ValueError(f"unknown fusion {name!r}; expected one of {FUSIONS}")
