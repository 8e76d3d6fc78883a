"""Exact evaluation metrics over a whole split, across ranks.

AUC is a ranking statistic: averaging per-rank AUCs (or binning scores, as streaming AUC
estimators do) is not the AUC of the union. So the predictions of all ranks are gathered and the
exact, rank-based AUC computed in float64; a paper-scale validation set (a few million samples,
18 bytes each) fits comfortably in host memory. The same `Evaluator`, fed with the logits of each
training step, gives the exact AUC over an epoch's training samples: 5 bytes a sample, gathered
and sorted on rank 0 only (about 25 bytes a sample there at the peak).
"""

from __future__ import annotations

import math
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

# The per-sample columns an Evaluator keeps and gathers, each in a dtype that holds the values
# the model and loader produce exactly; logits and labels come with every batch, the rest is
# optional.
COLUMNS: Dict[str, torch.dtype] = {
    "logits": torch.float32, "labels": torch.uint8, "gate": torch.float32, "hist_len": torch.int32, "user": torch.int64,
}  # fmt: skip
_OPTIONAL = ("gate", "hist_len", "user")


# sorted samples exact_auc sums over at a time: bounds its working memory beyond the sort
AUC_BLOCK = 1 << 20


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exactly: the Mann-Whitney U statistic with tied scores counted
    as half (equivalent to average ranks), summed in integers. NaN when only one class is present.

    One stable sort, then blocks of about AUC_BLOCK sorted samples, each ending with a whole group
    of equal scores: besides the inputs, about 13 bytes a sample for float32 scores (the sort's
    indices and the sorted scores and labels), 17 for float64, where a per-group table of the
    whole input would take 60. float32 scores are not widened: they order and tie as their
    float64 values do."""
    scores = np.asarray(scores).ravel()
    if scores.dtype != np.float32:
        scores = scores.astype(np.float64)
    positive = _binary_labels(labels)
    if scores.shape != positive.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} != {positive.size}")
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    scores, positive = scores[order], positive[order]
    del order
    # a positive beats every negative in lower groups and ties half of those in its own group:
    # twice its wins are integers
    twice_wins = negatives_below = start = 0
    while start < scores.size:
        end = int(np.searchsorted(scores, scores[min(start + AUC_BLOCK, scores.size) - 1], side="right"))
        block, pos = scores[start:end], positive[start:end]
        first = np.flatnonzero(np.concatenate(([True], block[1:] != block[:-1])))
        pos_in_group = np.add.reduceat(pos, first, dtype=np.int64)
        neg_in_group = np.diff(np.append(first, block.size)) - pos_in_group
        neg_below = negatives_below + np.cumsum(neg_in_group) - neg_in_group
        twice_wins += int(np.sum(pos_in_group * (2 * neg_below + neg_in_group)))
        negatives_below += int(neg_in_group.sum())
        start = end
    return twice_wins / (2 * num_pos * num_neg)


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

    Only the columns given are kept, each in a dtype that holds the values exactly (float32
    logits and gates, uint8 labels, int32 history lengths, int64 users): 5 bytes a sample for
    logits and labels alone (the train AUC), 18 with everything (validation). `compute` is a
    collective when torch.distributed is initialised: every rank must call it, and every rank
    gets the same dict and holds every rank's rows meanwhile. `auc` gathers the rows on one rank
    only. The gathered gate values stay in `gates` (None without gates) for a histogram.
    """

    def __init__(self) -> None:
        self._chunks: Dict[str, List[Tensor]] = {name: [] for name in COLUMNS}
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
        given = {"logits": logits, "labels": labels, "gate": gate, "hist_len": hist_len, "user": user}
        columns = {name: _to_column(values, n, name) for name, values in given.items() if values is not None}
        for name, column in columns.items():
            self._chunks[name].append(column)

    def __len__(self) -> int:
        """Samples collected on this rank."""
        return sum(chunk.numel() for chunk in self._chunks["logits"])

    def compute(self) -> Dict[str, object]:
        """auc, logloss, num_samples, positive_rate, mean_prediction, calibration; gauc (and its
        user counts) when users were given; gate statistics when gates were."""
        table = _gather_columns(self._local_columns(), root=None)
        logits, labels = table["logits"], table["labels"]
        result: Dict[str, object] = {
            "auc": exact_auc(logits, labels),
            "logloss": logloss_from_logits(logits, labels),
            "num_samples": int(labels.size),
            **calibration(logits, labels),
        }
        if "user" in table:
            result.update(gauc(logits, labels, table["user"]))
        self.gates = table.get("gate")
        if self.gates is not None:
            result.update(gate_statistics(self.gates, table.get("hist_len")))
        return result

    def auc(self, root: int = 0) -> float:
        """The exact AUC over every rank's rows, which only `root` gathers (the others hold just
        their own); `root` broadcasts the value, so every rank returns the same float. A
        collective, like `compute`."""
        table = _gather_columns(self._local_columns(), root=root)
        value = exact_auc(table["logits"], table["labels"]) if table is not None else math.nan
        if not _is_distributed():
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
        dist.broadcast(tensor, src=root)
        return float(tensor.item())

    def state_dict(self) -> Dict[str, Tensor]:
        """This rank's rows so far, one tensor per column given (for a checkpoint's rank file)."""
        return {name: column for name, column in self._local_columns().items() if column.numel()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Replace the rows with those of `state_dict`."""
        self.reset()
        for name, column in state.items():
            self._chunks[name].append(column.to(COLUMNS[name]))

    def reset(self) -> None:
        self._chunks = {name: [] for name in COLUMNS}
        self.gates = None

    def _local_columns(self) -> Dict[str, Tensor]:
        """Each column's rows as one tensor (empty when not given). The chunks are merged in
        place: the rows are then held once, not in chunks and again in a concatenated copy."""
        for name, chunks in self._chunks.items():
            if len(chunks) > 1:
                self._chunks[name] = [torch.cat(chunks)]
        return {name: chunks[0] if chunks else torch.empty(0, dtype=COLUMNS[name]) for name, chunks in self._chunks.items()}


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    positive = labels == 1
    if not np.all(positive | (labels == 0)):
        raise ValueError("labels must be 0 or 1")
    return positive


def _to_column(values: Tensor, n: int, name: str) -> Tensor:
    """A copy on the CPU in the column's dtype (the caller may reuse its tensor). Labels are
    checked first: uint8 would turn a soft label into 0 silently."""
    if values.numel() != n:
        raise ValueError(f"{name} has {values.numel()} values for {n} logits")
    values = values.detach().reshape(-1).to("cpu")
    if name == "labels":
        _binary_labels(values.numpy())
    return values.to(COLUMNS[name], copy=True)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# how many of a rank's samples have a column: none, all, or only some (a caller bug)
_NONE, _ALL, _SOME = 0, 1, 2


def _gather_columns(local: Dict[str, Tensor], root: Optional[int]) -> Optional[Dict[str, np.ndarray]]:
    """Every rank's rows, concatenated in rank order: the columns given, as numpy arrays, on every
    rank (`root` None: all_gather) or on `root` only (gather; None on the other ranks).

    Ranks hold different numbers of rows, and all_gather and gather need equal shapes (gloo and
    NCCL alike): first all ranks exchange a header (their row count and which columns they have,
    so that all decide alike which columns to gather, or that a column is given for some batches
    only), then each column is padded to the largest count, gathered and trimmed. Run on gloo
    only so far; on NCCL the tensors live on the rank's GPU (collective_device)."""
    n = local["logits"].numel()
    coverage = [_NONE if not local[name].numel() else _ALL if local[name].numel() == n else _SOME for name in _OPTIONAL]
    header = torch.tensor([n, *coverage], dtype=torch.int64)
    if _is_distributed():
        device, world = collective_device(), dist.get_world_size()
        headers = [torch.zeros_like(header, device=device) for _ in range(world)]
        dist.all_gather(headers, header.to(device))
        headers = [h.cpu() for h in headers]
    else:
        device, world, headers = None, 1, [header]
    counts = [int(h[0]) for h in headers]
    names = ["logits", "labels"]
    for i, name in enumerate(_OPTIONAL, start=1):
        given = [int(h[i]) for h, count in zip(headers, counts) if count]
        if any(g != _NONE for g in given):
            if any(g != _ALL for g in given):
                raise ValueError(f"{name} was given for some batches but not for others")
            names.append(name)
    if world == 1:
        return {name: local[name].numpy() for name in names}
    receives = root is None or dist.get_rank() == root
    table = {}
    for name in names:
        padded = torch.zeros(max(counts), dtype=COLUMNS[name], device=device)
        padded[: local[name].numel()] = local[name].to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)] if receives else None
        if root is None:
            dist.all_gather(gathered, padded)
        else:
            dist.gather(padded, gathered, dst=root)
        if receives:
            # trimmed and concatenated on the host: the device holds the gathered copy only
            table[name] = np.concatenate([g[:count].cpu().numpy() for g, count in zip(gathered, counts)])
    return table if receives else None
