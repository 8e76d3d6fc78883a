"""The training objective: binary cross-entropy with label smoothing (MDAF_paper.md 4.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_bce(logits: torch.Tensor, labels: torch.Tensor, eps: float = 0.01, reduction: str = "mean") -> torch.Tensor:
    """BCE against y' = (1 - eps) y + eps / 2 (mean, or per sample with reduction="none"),
    computed from logits for numerical stability; smoothing keeps the model from driving logits
    to +-inf on noisy click labels."""
    targets = labels.to(logits.dtype) * (1.0 - eps) + eps / 2.0
    return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
