"""The paper's published numbers (MDAF_paper.md), typed from its tables for the reports to show
beside ours. They are never used as our results. (Table 7's are in mdaf_dist.analysis.dynamics,
whose table the reports reuse.)

Each table names its source; rows are keyed by the labels the study files give their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from mdaf_dist.data.paper_counts import COUNTS


@dataclass(frozen=True)
class PaperRow:
    auc: float
    logloss: Optional[float] = None
    # the paper's own delta column, in basis points (None where it says "baseline")
    delta_bp: Optional[int] = None
    parameters: str = ""
    train_samples: Optional[int] = None
    note: str = ""
    # Table 2's Type column: Static, Sequential or Hybrid
    kind: str = ""
    test_auc: Optional[float] = None


@dataclass(frozen=True)
class PaperTable:
    source: str
    rows: Dict[str, PaperRow]
    reference: str = ""
    # what the report's column headers call it ("Paper Val AUC")
    title: str = "Paper"


TABLE2 = PaperTable(
    source="MDAF_paper.md 5.2, Table 2 (Val AUC, Log Loss, Improvement over BST); static-only: Table 3",
    reference="BST",
    rows={
        "AutoInt": PaperRow(0.5499, 0.679, -212, "10M", kind="Static"),
        "DCNv2": PaperRow(0.5498, 0.680, -213, "12M", kind="Static"),
        "BST": PaperRow(0.5711, 0.665, None, "130M", kind="Sequential"),
        "Mamba4Rec": PaperRow(0.5716, 0.664, +5, "31M", kind="Sequential"),
        "MDAF": PaperRow(0.6007, 0.652, +296, "46M", kind="Hybrid"),
        "Static only (DCNv3)": PaperRow(0.5498, 0.680, -213, note="Table 3 row; delta against BST computed from it", kind="Static"),
    },
)

# The authors' repository README ("Performance Results"), a second "paper" for studies that run
# configs/authors_readme.yaml (report.paper2): its own Table 2, with a test AUC per model and
# other AutoInt/DCNv2 numbers and parameter counts than the paper's Table 2
AUTHORS_README_TABLE2 = PaperTable(
    source="the MDAF authors' repository README, Performance Results (Val AUC, Test AUC, Parameters, Improvement vs BST)",
    reference="BST",
    title="Authors' README",
    rows={
        "BST": PaperRow(0.5711, None, None, "130M", test_auc=0.5698),
        "AutoInt": PaperRow(0.5655, None, -56, "23M", test_auc=0.5648),
        "DCNv2": PaperRow(0.5602, None, -109, "23M", test_auc=0.5594),
        "MDAF": PaperRow(0.6007, None, +296, "46M", test_auc=0.5992),
    },
)

TABLE3 = PaperTable(
    source="MDAF_paper.md 5.3, Table 3 (Val AUC, Difference from Full, Log Loss)",
    reference="MDAF (Full)",
    rows={
        "MDAF (Full)": PaperRow(0.6007, 0.652, None),
        "w/o Gate (concat)": PaperRow(0.5768, 0.663, -239),
        "Fixed gate (g=0.5)": PaperRow(0.5792, 0.661, -215),
        "Static only (DCNv3)": PaperRow(0.5498, 0.680, -509),
        "Sequential only (Mamba4Rec)": PaperRow(0.5716, 0.664, -291),
        "Mamba4Rec + MLP fusion": PaperRow(0.5854, 0.657, -153),
        "DCNv3 + attention fusion": PaperRow(0.5981, 0.653, -26),
    },
)

TABLE6 = PaperTable(
    source="MDAF_paper.md 5.5, Table 6 (Train Samples, Val AUC, Improvement over the previous stage)",
    # the training samples of each stage are 5.1.1's counts, typed once in data.paper_counts
    rows={
        "Raw data": PaperRow(0.5826, None, None, train_samples=COUNTS["samples"]["train"]),
        "+ Empty sequence removal": PaperRow(0.5826, None, 0, train_samples=COUNTS["empty_history"]["train"]),
        "+ Category filtering": PaperRow(0.5931, None, +105, train_samples=COUNTS["category_filter"]["train"]),
        "+ Hyperparameter tuning": PaperRow(0.6007, None, +76, train_samples=COUNTS["category_filter"]["train"]),
    },
)

# the settings each Table 6 stage trained with, so a row of any filter study is matched to the
# paper's by what it ran (its prepare.* settings alone for the sample count); dropout 0.25 is the
# paper's before its tuning (5.5), 0.15 after (configs/paper.yaml)
TABLE6_SETTINGS: Dict[str, Dict[str, object]] = {
    "Raw data": {"prepare.drop_empty_history": False, "prepare.category_filter": "none", "model.dropout": 0.25},
    "+ Empty sequence removal": {"prepare.drop_empty_history": True, "prepare.category_filter": "none", "model.dropout": 0.25},
    "+ Category filtering": {"prepare.drop_empty_history": True, "prepare.category_filter": "last_l", "model.dropout": 0.25},
    "+ Hyperparameter tuning": {"prepare.drop_empty_history": True, "prepare.category_filter": "last_l", "model.dropout": 0.15},
}

@dataclass(frozen=True)
class Sensitivity:
    """One row of Table A1: validation AUC per value tried, the best value, the paper's verdict."""

    hyperparameter: str
    auc_by_value: Dict[float, float]
    best: float
    sensitivity: str

    def values(self) -> List[float]:
        return list(self.auc_by_value)


TABLEA1_SOURCE = "MDAF_paper.md appendix A, Table A1 (Values Tested, Best Value, AUC Range, Sensitivity)"
# keyed by the config key each study axis sets
TABLEA1: Dict[str, Sensitivity] = {
    "train.lr": Sensitivity("Learning rate", {1e-4: 0.5876, 5e-4: 0.6007, 1e-3: 0.5923}, 5e-4, "High"),
    "model.dropout": Sensitivity("Dropout", {0.05: 0.5789, 0.10: 0.5912, 0.15: 0.6007, 0.20: 0.5893, 0.25: 0.5826}, 0.15, "High"),
    "train.weight_decay": Sensitivity("Weight decay", {0.0: 0.5968, 1e-6: 0.5983, 1e-5: 0.6007, 1e-4: 0.5921}, 1e-5, "Medium"),
    "model.label_smoothing": Sensitivity("Label smoothing", {0.0: 0.5992, 0.01: 0.6007, 0.05: 0.5974, 0.1: 0.5891}, 0.01, "Low"),
    "loader.batch_size": Sensitivity("Batch size", {512: 0.5978, 1024: 0.5994, 2048: 0.6007, 4096: 0.6001}, 2048, "Low"),
}

TABLES: Dict[str, PaperTable] = {"table2": TABLE2, "table2_authors_readme": AUTHORS_README_TABLE2, "table3": TABLE3, "table6": TABLE6}


def paper_auc_at(key: str, value: float) -> Optional[float]:
    """Table A1's AUC for `key` set to `value` (None when the paper did not try it)."""
    row = TABLEA1.get(key)
    if row is None:
        return None
    for tried, auc in row.auc_by_value.items():
        if abs(tried - value) <= 1e-9 * max(1.0, abs(tried)):
            return auc
    return None
