"""Exact evaluation metrics over a whole split, across ranks.

AUC is a ranking statistic: averaging per-rank AUCs (or binning scores, as streaming AUC
estimators do) is not the AUC of the union. So every rank gathers all predictions and computes
the same exact, rank-based AUC in float64; a paper-scale validation set (a few million samples,
five float64 columns) fits comfortably in host memory. The same `Evaluator`, fed with the
logits of each training step, gives the exact AUC over an epoch's training samples.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mdaf_dist.distributed.env import collective_device

# History-length groups of the gate analysis, [low, high] inclusive, high None = open-ended.
# MDAF_paper.md 5.4, Table 5 (user activity: <10, 10-30, >30 history items); the training logs
# report the gate mean per group. Appendix B, Table B2 (sequence length) uses finer groups.
ACTIVITY_GROUPS: Tuple[Tuple[int, Optional[int]], ...] = ((0, 9), (10, 30), (31, None))
SEQUENCE_LENGTH_GROUPS: Tuple[Tuple[int, Optional[int]], ...] = ((1, 5), (6, 15), (16, 35), (36, 50))
# Table 4's order statistics: min, 25th percentile, median, 75th percentile, max
GATE_PERCENTILES = ((0, "min"), (25, "p25"), (50, "median"), (75, "p75"), (100, "max"))

# Columns of the per-sample table gathered across ranks; NaN marks a column not given.
_LOGIT, _LABEL, _GATE, _HIST_LEN, _USER = range(5)
_NUM_COLUMNS = 5


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


def gauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> Dict[str, float]:
    """Group AUC: the exact AUC of each user's samples, averaged with the user's number of
    samples (impressions) as weight. Users whose samples are all of one class have no AUC: they
    are skipped and counted ("gauc_users_skipped"). One sort over (user, score), then the
    `exact_auc` tie rule per user with cumulative sums: no loop over users."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = _binary_labels(labels)
    users = np.asarray(users).ravel()
    if not scores.shape == positive.shape == users.shape:
        raise ValueError(f"scores, labels and users differ in length: {scores.size}, {positive.size}, {users.size}")
    if not scores.size:
        return {"gauc": float("nan"), "gauc_users": 0, "gauc_users_skipped": 0}
    order = np.lexsort((scores, users))
    user, score, pos = users[order], scores[order], positive[order]
    # one group per distinct (user, score), ascending within each user
    starts = np.ones(len(user), dtype=bool)
    starts[1:] = (user[1:] != user[:-1]) | (score[1:] != score[:-1])
    group = np.cumsum(starts) - 1
    pos_in_group = np.bincount(group, weights=pos.astype(np.float64))
    neg_in_group = np.bincount(group, weights=(~pos).astype(np.float64))
    group_user = user[starts]
    first_of_user = np.ones(len(group_user), dtype=bool)
    first_of_user[1:] = group_user[1:] != group_user[:-1]
    user_index = np.cumsum(first_of_user) - 1
    neg_before = np.cumsum(neg_in_group) - neg_in_group
    neg_below = neg_before - neg_before[first_of_user][user_index]
    wins = np.bincount(user_index, weights=pos_in_group * (neg_below + 0.5 * neg_in_group))
    num_pos = np.bincount(user_index, weights=pos_in_group)
    num_neg = np.bincount(user_index, weights=neg_in_group)
    both = (num_pos > 0) & (num_neg > 0)
    weight = (num_pos + num_neg)[both]
    per_user = wins[both] / (num_pos[both] * num_neg[both])
    value = float(np.sum(per_user * weight) / np.sum(weight)) if both.any() else float("nan")
    return {"gauc": value, "gauc_users": int(both.sum()), "gauc_users_skipped": int((~both).sum())}


def calibration(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Mean predicted probability, positive rate, and their ratio (1 = calibrated on average)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if not z.size:
        return {"mean_prediction": float("nan"), "positive_rate": float("nan"), "calibration": float("nan")}
    mean_prediction = float(np.mean(1.0 / (1.0 + np.exp(-z))))
    rate = float(y.mean())
    return {"mean_prediction": mean_prediction, "positive_rate": rate, "calibration": mean_prediction / rate if rate > 0 else float("nan")}


def group_name(low: int, high: Optional[int]) -> str:
    """"10-30" for [10, 30]; "31+" for [31, None)."""
    if high is None:
        return f"{low}+"
    return str(low) if low == high else f"{low}-{high}"


def in_group(values: np.ndarray, low: int, high: Optional[int]) -> np.ndarray:
    return (values >= low) & (values <= (np.inf if high is None else high))


def gate_statistics(gates: np.ndarray, hist_len: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Mean, population std and Table 4's order statistics of the fusion gate, and its mean per
    activity group of Table 5 (keys "0-9", "10-30", "31+"; empty groups are left out)."""
    gates = np.asarray(gates, dtype=np.float64).ravel()
    stats: Dict[str, object] = {"gate_mean": float(gates.mean()), "gate_std": float(gates.std())}
    for (q, name), value in zip(GATE_PERCENTILES, np.percentile(gates, [q for q, _ in GATE_PERCENTILES])):
        stats[f"gate_{name}"] = float(value)
    if hist_len is not None:
        hist_len = np.asarray(hist_len).ravel()
        by_group = {}
        for low, high in ACTIVITY_GROUPS:
            inside = in_group(hist_len, low, high)
            if inside.any():
                by_group[group_name(low, high)] = float(gates[inside].mean())
        stats["gate_by_hist_len"] = by_group
    return stats


class Evaluator:
    """Collects a pass over a split batch by batch and computes exact metrics over all ranks.

    `compute` is a collective when torch.distributed is initialised: every rank must call it,
    and every rank gets the same dict. The gathered gate values stay in `gates` (None without
    gates) for a histogram. Each sample costs 40 bytes on every rank once gathered.
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
        user: Optional[Tensor] = None,
    ) -> None:
        n = logits.numel()
        chunk = np.full((n, _NUM_COLUMNS), np.nan)
        chunk[:, _LOGIT] = _to_numpy(logits, n, "logits")
        chunk[:, _LABEL] = _to_numpy(labels, n, "labels")
        for column, values, name in ((_GATE, gate, "gate"), (_HIST_LEN, hist_len, "hist_len"), (_USER, user, "user")):
            if values is not None:
                chunk[:, column] = _to_numpy(values, n, name)
        self._chunks.append(chunk)

    def compute(self) -> Dict[str, object]:
        """auc, logloss, num_samples, positive_rate, mean_prediction, calibration; gauc (and its
        user counts) when users were given; gate statistics when gates were."""
        local = np.concatenate(self._chunks) if self._chunks else np.empty((0, _NUM_COLUMNS))
        table = _all_gather_rows(local)
        logits, labels = table[:, _LOGIT], table[:, _LABEL]
        result: Dict[str, object] = {
            "auc": exact_auc(logits, labels),
            "logloss": logloss_from_logits(logits, labels),
            "num_samples": int(labels.size),
            **calibration(logits, labels),
        }
        users = _complete_column(table[:, _USER], "user")
        if users is not None:
            result.update(gauc(logits, labels, users))
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
        raise ValueError(f"{name} was given for some batches but not for others")
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
