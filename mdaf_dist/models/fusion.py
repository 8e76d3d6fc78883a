"""Ways to combine h_static and h_seq (both [B, D]) into one representation for the head.

Every fusion is a module with `forward(h_static, h_seq) -> (h, gate)` and an `out_dim`; `gate` is
the per-sample weight of the sequential branch [B] where the fusion has one, else None. A fusion
whose `takes_tokens` is True also gets each branch's tokens as keyword arguments: static_tokens
[B, 4, D] (x_0's user, item and category, then h_static), seq_tokens [B, L, D] (the sequential
branch's output at every step, zero on padding; the last is h_seq) and seq_mask [B, L] (True on
real steps).
"""

from __future__ import annotations

from typing import Optional, Tuple, get_args

import torch
from torch import nn

from mdaf_dist.config import CrossAttentionDirection, Fusion, ModelConfig
from mdaf_dist.models.dlf import NetworkAwareAttention
from mdaf_dist.models.optfusion import Architecture, OptFusionFusion

FUSIONS = get_args(Fusion)
CROSS_ATTENTION_DIRECTIONS = get_args(CrossAttentionDirection)

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
    """Self-attention over the two branch vectors (`attention`): h_s and h_q are two tokens of
    one multi-head self-attention, the attended pair is fused by ReLU(W [a_s; a_q] + b), and a
    gated residual in the form of DLF's eq. 9, max(eps, W_gate r) * r with r = (h_s + h_q) / 2,
    is added, so the fusion starts near the plain average. About 3.5x the gate's parameters at
    D = 64. It is neither DLF's NAF (`dlf_naf`: token-level, separate softmaxes) nor the MDAF
    paper's sequence-to-static attention (`cross_attention`)."""

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


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] averaged over the steps where mask [B, L] is True; zero where none is."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class CrossAttentionFusion(nn.Module):
    """The MDAF paper's attention fusion (5.3, "allowing the sequential branch to attend to the
    static branch"), `cross_attention`. `seq_to_static`: the sequential branch's output at every
    step H is a query over the static tokens S, s = LayerNorm(H + MHA(H, S, S)) averaged over the
    real steps. `static_to_seq`: h_static is a query over the real steps,
    t = LayerNorm(h_s + MHA(h_s, H, H)) (an empty history adds nothing). `both` does both, each
    with its own attention. h = W [t or h_s; s or h_q] + b in R^D. One direction at D = 64:
    (4D^2 + 4D) + 2D + (2D^2 + D) = 25,024 parameters, 3.0x the gate's (the paper: "3x")."""

    takes_tokens = True

    def __init__(self, dim: int, num_heads: int, dropout: float, direction: str):
        super().__init__()
        if direction not in CROSS_ATTENTION_DIRECTIONS:
            raise ValueError(f"unknown cross_attention_direction {direction!r}; expected one of {CROSS_ATTENTION_DIRECTIONS}")
        self.out_dim = dim
        self.seq_to_static = self.static_to_seq = None
        if direction != "static_to_seq":
            self.seq_to_static = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
            self.seq_norm = nn.LayerNorm(dim)
        if direction != "seq_to_static":
            self.static_to_seq = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
            self.static_norm = nn.LayerNorm(dim)
        self.fuse = nn.Linear(2 * dim, dim)

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor, *, static_tokens: torch.Tensor,
                seq_tokens: torch.Tensor, seq_mask: torch.Tensor) -> Fused:
        if self.seq_to_static is not None:
            attended, _ = self.seq_to_static(seq_tokens, static_tokens, static_tokens, need_weights=False)
            h_seq = masked_mean(self.seq_norm(seq_tokens + attended), seq_mask)
        if self.static_to_seq is not None:
            has_history = seq_mask.any(1, keepdim=True)
            # an empty history masks no key (its tokens are zeros) and its result is dropped
            padding = ~seq_mask & has_history
            attended, _ = self.static_to_seq(h_static.unsqueeze(1), seq_tokens, seq_tokens, key_padding_mask=padding, need_weights=False)
            h_static = self.static_norm(h_static + attended.squeeze(1) * has_history)
        return self.fuse(torch.cat([h_static, h_seq], dim=-1)), None


class DLFNAFFusion(nn.Module):
    """DLF's NAF (DLF_paper.md 4.3) between MDAF's branches, `dlf_naf`: the static tokens and the
    sequential steps are two blocks; each block's query attends to the other block (eqs. 11-12)
    and to itself (eq. 13) with separate softmaxes (padded steps masked), Att = ReLU(W_F
    [Att^C_s + Att^S_s; Att^C_q + Att^S_q] + b_F) (eq. 14), and eq. 15's concatenation
    [h_s; h_q; Att] (3D) goes to the head. Only the rows eq. 15 keeps are computed: those of
    h_static's token and of the last step (h_seq). At D = 64: 7D^2 + 6D = 29,056 parameters."""

    takes_tokens = True

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = 3 * dim
        self.naf = NetworkAwareAttention(dim, num_blocks=2)

    def forward(self, h_static: torch.Tensor, h_seq: torch.Tensor, *, static_tokens: torch.Tensor,
                seq_tokens: torch.Tensor, seq_mask: torch.Tensor) -> Fused:
        att = self.naf([static_tokens, seq_tokens], [None, seq_mask], last_only=True).squeeze(1)
        return torch.cat([h_static, h_seq, att], dim=-1), None


def build_fusion(cfg: ModelConfig, dim: int, optfusion_architecture: Optional[Architecture] = None) -> nn.Module:
    """`cfg.fusion` at width `dim`; `optfusion_architecture`: OptFusion's selection to re-train
    (models/optfusion.py), None while searching."""
    name = cfg.fusion
    if name == "gate":
        return AdaptiveGate(dim, cfg.gate_hidden)
    if name == "concat":
        return ConcatFusion(dim)
    if name == "fixed":
        return FixedGate(dim, cfg.fixed_gate)
    if name == "attention":
        return AttentionFusion(dim, cfg.num_heads, cfg.dropout)
    if name == "cross_attention":
        return CrossAttentionFusion(dim, cfg.num_heads, cfg.dropout, cfg.cross_attention_direction)
    if name == "dlf_naf":
        return DLFNAFFusion(dim)
    if name == "optfusion":
        return OptFusionFusion(dim, cfg.optfusion_search_lr, optfusion_architecture)
    raise ValueError(f"unknown fusion {name!r}; expected one of {FUSIONS}")
