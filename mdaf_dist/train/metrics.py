"""Exact validation metrics over the whole validation set, across ranks.

AUC is a ranking statistic: averaging per-rank AUCs (or binning scores, as streaming AUC
estimators do) is not the AUC of the union. So every rank gathers all predictions and computes
the same exact, rank-based AUC in float64; a paper-scale validation set (a few million samples,
four float64 columns) fits comfortably in host memory.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mdaf_dist.distributed.env import collective_device

# History-length buckets for the gate analysis (MDAF_paper.md 5.5): [low, high] inclusive;
# the last bucket is open-ended so that configs with histories longer than 50 are still counted.
HIST_LEN_BUCKETS: Tuple[Tuple[int, Optional[int]], ...] = (
    (0, 0),
    (1, 5),
    (6, 10),
    (11, 20),
    (21, 50),
    (51, None),
)
GATE_PERCENTILES = (5, 25, 50, 75, 95)

# Columns of the per-sample table gathered across ranks; NaN marks a column not given.
_LOGIT, _LABEL, _GATE, _HIST_LEN = range(4)
_NUM_COLUMNS = 4


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exactly: the Mann-Whitney U statistic with tied scores counted
    as half (equivalent to average ranks). NaN when only one class is present."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = _binary_labels(labels)
    if scores.shape != positive.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} != {positive.size}")
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    # One group per distinct score, in ascending order: a positive beats every negative in
    # lower groups and ties half of the negatives in its own group.
    _, group = np.unique(scores, return_inverse=True)
    pos_in_group = np.bincount(group, weights=positive.astype(np.float64))
    neg_in_group = np.bincount(group, weights=(~positive).astype(np.float64))
    neg_below = np.cumsum(neg_in_group) - neg_in_group
    wins = np.sum(pos_in_group * (neg_below + 0.5 * neg_in_group))
    return float(wins / (float(num_pos) * float(num_neg)))


def logloss_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy computed from logits in float64: log(1 + e^z) - y z written as
    max(z, 0) - y z + log1p(e^-|z|), which neither overflows nor loses precision near p = 0 or 1."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"logits and labels differ in length: {z.size} != {y.size}")
    if z.size == 0:
        return float("nan")
    return float(np.mean(np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))))


def gate_statistics(gates: np.ndarray, hist_len: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Mean, population std and percentiles of the fusion gate, and its mean per
    history-length bucket (keys like "1-5", "51+"; empty buckets are left out)."""
    gates = np.asarray(gates, dtype=np.float64).ravel()
    stats: Dict[str, object] = {"gate_mean": float(gates.mean()), "gate_std": float(gates.std())}
    for q, value in zip(GATE_PERCENTILES, np.percentile(gates, GATE_PERCENTILES)):
        stats[f"gate_p{q}"] = float(value)
    if hist_len is not None:
        hist_len = np.asarray(hist_len).ravel()
        by_bucket = {}
        for low, high in HIST_LEN_BUCKETS:
            inside = (hist_len >= low) & (hist_len <= (np.inf if high is None else high))
            if inside.any():
                by_bucket[_bucket_name(low, high)] = float(gates[inside].mean())
        stats["gate_by_hist_len"] = by_bucket
    return stats


class Evaluator:
    """Collects a validation pass batch by batch and computes exact metrics over all ranks.

    `compute` is a collective when torch.distributed is initialised: every rank must call it,
    and every rank gets the same dict. The gathered gate values stay in `gates` (None without
    gates) for a histogram.
    """

    def __init__(self) -> None:
        self._chunks: List[np.ndarray] = []
        self.gates: Optional[np.ndarray] = None

    def update(
        self,
        logits: Tensor,
        labels: Tensor,
        gate: Optional[Tensor] = None,
        hist_len: Optional[Tensor] = None,
    ) -> None:
        n = logits.numel()
        chunk = np.full((n, _NUM_COLUMNS), np.nan)
        chunk[:, _LOGIT] = _to_numpy(logits, n, "logits")
        chunk[:, _LABEL] = _to_numpy(labels, n, "labels")
        if gate is not None:
            chunk[:, _GATE] = _to_numpy(gate, n, "gate")
        if hist_len is not None:
            chunk[:, _HIST_LEN] = _to_numpy(hist_len, n, "hist_len")
        self._chunks.append(chunk)

    def compute(self) -> Dict[str, object]:
        local = np.concatenate(self._chunks) if self._chunks else np.empty((0, _NUM_COLUMNS))
        table = _all_gather_rows(local)
        logits, labels = table[:, _LOGIT], table[:, _LABEL]
        result: Dict[str, object] = {
            "auc": exact_auc(logits, labels),
            "logloss": logloss_from_logits(logits, labels),
            "num_samples": int(labels.size),
            "positive_rate": float(labels.mean()) if labels.size else float("nan"),
        }
        self.gates = _complete_column(table[:, _GATE], "gate")
        if self.gates is not None:
            hist_len = _complete_column(table[:, _HIST_LEN], "hist_len")
            result.update(gate_statistics(self.gates, hist_len))
        return result

    def reset(self) -> None:
        self._chunks = []
        self.gates = None


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    positive = labels == 1
    if not np.all(positive | (labels == 0)):
        raise ValueError("labels must be 0 or 1")
    return positive


def _bucket_name(low: int, high: Optional[int]) -> str:
    if high is None:
        return f"{low}+"
    return str(low) if low == high else f"{low}-{high}"


def _to_numpy(values: Tensor, n: int, name: str) -> np.ndarray:
    if values.numel() != n:
        raise ValueError(f"{name} has {values.numel()} values for {n} logits")
    return values.detach().reshape(-1).to("cpu", torch.float64).numpy()


def _complete_column(column: np.ndarray, name: str) -> Optional[np.ndarray]:
    """The column if it was given for every sample, None if for none; a mix is a caller bug."""
    given = ~np.isnan(column)
    if not given.any():
        return None
    if not given.all():
        raise ValueError(f"{name} was given for some validation batches but not for others")
    return column


def _all_gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows in rank order. Ranks hold different numbers of rows, and
    all_gather needs equal shapes (gloo and NCCL alike): gather the sizes, pad to the largest,
    gather, trim."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = collective_device()
    world = dist.get_world_size()
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), _NUM_COLUMNS), dtype=torch.float64, device=device)
    padded[: local.shape[0]] = torch.from_numpy(local).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return np.concatenate([g[:count].cpu().numpy() for g, count in zip(gathered, counts)])
