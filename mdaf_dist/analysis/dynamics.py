"""Table 7 of MDAF_paper.md 5.6, training dynamics, from a run's per-epoch evaluations.

Each evaluation the trainer records (results.json "evaluations", or a checkpoint's trainer.json)
holds the epoch's train AUC (exact, over that epoch's training samples, from the training-mode
forward: dropout on, weights as they were at each step; None, shown "n/a", when the run had
train.train_auc off), the validation AUC and logloss.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

from mdaf_dist.analysis.report import Table

# epoch -> (train AUC, val AUC, train-val gap, val logloss, status), as printed in Table 7
PAPER_TABLE7 = {
    1: (0.5363, 0.6007, -0.0644, 0.652, "Best (healthy)"),
    2: (0.7738, 0.5416, 0.2322, 0.685, "Overfitting starts"),
    3: (0.9162, 0.5308, 0.3854, 0.694, "Severe overfitting"),
    4: (0.9707, 0.5268, 0.4439, 0.698, "Very severe"),
    5: (0.9916, 0.5247, 0.4669, 0.701, "Extreme overfitting"),
    6: (0.9970, 0.5436, 0.4534, 0.699, "Model diverging"),
}
NOT_RECORDED = "n/a"
COLUMNS = [
    "Epoch", "Train AUC", "Val AUC", "Train-Val Gap", "Log Loss (Val)", "Status",
    "Paper Train AUC", "Paper Val AUC", "Paper Gap", "Paper Log Loss", "Paper Status",
]  # fmt: skip


def table7(evaluations: Sequence[Dict[str, Any]]) -> Table:
    """One row per epoch of ours, then the paper's epochs we did not run; "Best" marks the
    evaluation with the highest validation AUC (the one early stopping keeps)."""
    ours = {int(e["epoch"]): e for e in evaluations}
    # an undefined AUC (one class) is null in results.json, NaN in memory
    valid = [e["auc"] for e in evaluations if e["auc"] is not None and not math.isnan(e["auc"])]
    best = max(valid) if valid else None
    rows: List[list] = []
    for epoch in sorted(set(ours) | set(PAPER_TABLE7)):
        e = ours.get(epoch)
        paper = list(PAPER_TABLE7.get(epoch, (None,) * 5))
        if e is None:
            rows.append([epoch, None, None, None, None, None, *paper])
            continue
        status = "Best" if best is not None and e["auc"] == best else ""
        # None: not recorded (train.train_auc=false)
        train_auc = e.get("train_auc")
        gap = NOT_RECORDED if train_auc is None else None if e["auc"] is None else train_auc - e["auc"]
        rows.append([epoch, NOT_RECORDED if train_auc is None else train_auc, e["auc"], gap, e["logloss"], status, *paper])
    return Table("table7", "Table 7: training dynamics across epochs", COLUMNS, rows,
                 "Train AUC: exact over each epoch's training samples, from the training forward (dropout on).")  # fmt: skip
