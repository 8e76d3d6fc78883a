"""What every model returns, and the prediction heads that produce its logit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.mlp import MLP


@dataclass
class ModelOutput:
    """logits [B] (before the sigmoid); gate [B]: the weight g of the sequential branch, where the
    model has one; h_static / h_seq [B, D]: the branch representations entering the fusion."""

    logits: torch.Tensor
    gate: Optional[torch.Tensor] = None
    h_static: Optional[torch.Tensor] = None
    h_seq: Optional[torch.Tensor] = None


def prediction_head(in_dim: int, hidden: int) -> nn.Sequential:
    """The paper's prediction layer (4.6): in -> hidden -> 1 with ReLU, returning a logit."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def mlp_head(in_dim: int, hidden: List[int], dropout: float) -> nn.Sequential:
    """The baselines' deep tower: ReLU layers of the given widths, dropout, then a logit."""
    if not hidden:
        raise ValueError("mlp_hidden needs at least one layer width")
    return nn.Sequential(MLP(in_dim, list(hidden)), nn.Dropout(dropout), nn.Linear(hidden[-1], 1))
