"""What a study's cells measured, read back from their records, and mean +- std over seeds.

Per cell: results.json (written by training) and the meta.json of the prepared data it trained
on. "Val AUC" is the best validation AUC (`best_auc`, the epoch early stopping keeps, as the
paper reports) and its log loss (and train AUC, when training records one) are that epoch's;
"test AUC" is `results["test"]["auc"]` when the run had a test split. "Common AUC" (log loss,
samples) is the best checkpoint's on the study's common evaluation set (common.json,
studies.common). A metric a record lacks is None, shown as "n/a".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from mdaf_dist.data.layout import META_FILE
from mdaf_dist.files import read_json
from mdaf_dist.studies.common import COMMON_JSON, COMMON_PREDICTIONS
from mdaf_dist.studies.workdir import CELL_CONFIG, StudyDir

METRICS = (
    "auc", "logloss", "train_auc", "test_auc", "common_auc", "common_logloss", "common_samples", "samples_per_sec",
    "samples_trained", "wall_seconds", "epoch_seconds", "train_samples", "valid_samples", "train_positive_share",
)  # fmt: skip


@dataclass
class CellRecord:
    id: str
    coords: Dict[str, str]
    seed: int
    world_size: int
    state: str
    error: Optional[str]
    results: Optional[Dict[str, Any]]
    meta: Optional[Dict[str, Any]]
    # the cell's directory, its config.yaml (None before it was written) and common.json
    dir: Path
    config: Optional[DictConfig] = None
    common: Optional[Dict[str, Any]] = None

    def setting(self, key: str) -> Any:
        """A dotted setting of the cell's config (None when unknown)."""
        return None if self.config is None else OmegaConf.select(self.config, key)

    def common_predictions(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(labels, logits) of the cell on the common evaluation set, in the set's row order."""
        parts = sorted((self.dir / COMMON_PREDICTIONS).glob("part-*.parquet")) if self.common else []
        if not parts:
            return None
        table = pa.concat_tables([pq.read_table(part, columns=["label", "logit"]) for part in parts])
        return table.column("label").to_numpy(), table.column("logit").to_numpy()

    def best_evaluation(self) -> Dict[str, Any]:
        if not self.results:
            return {}
        evaluations = self.results.get("evaluations") or []
        best = [e for e in evaluations if e.get("step") == self.results.get("best_step")]
        best = best or [e for e in evaluations if e.get("epoch") == self.results.get("best_epoch")]
        return best[-1] if best else {}

    def metric(self, name: str) -> Optional[float]:
        r, meta, best, common = self.results or {}, self.meta or {}, self.best_evaluation(), self.common or {}
        train_samples, throughput = meta.get("splits", {}).get("train", {}).get("rows"), r.get("samples_per_sec")
        value: Any = {
            "auc": r.get("best_auc"),
            "logloss": best.get("logloss"),
            "train_auc": best.get("train_auc"),
            "test_auc": (r.get("test") or {}).get("auc"),
            "common_auc": common.get("auc"),
            "common_logloss": common.get("logloss"),
            "common_samples": common.get("samples"),
            "samples_per_sec": r.get("samples_per_sec"),
            "samples_trained": r.get("samples_trained"),
            "wall_seconds": r.get("wall_seconds"),
            # one epoch's training samples at the run's pace (evaluation and checkpoints included)
            "epoch_seconds": train_samples / throughput if train_samples and throughput else None,
            "train_samples": train_samples,
            "valid_samples": meta.get("splits", {}).get("valid", {}).get("rows"),
            "train_positive_share": meta.get("splits", {}).get("train", {}).get("positive_share"),
        }[name]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return float(value)

    def curve(self) -> List[Dict[str, Any]]:
        """Per-epoch evaluations (epoch, auc, logloss, train_auc when recorded)."""
        return list((self.results or {}).get("evaluations") or [])


@dataclass
class Stat:
    """Mean and sample standard deviation (n - 1) of one metric over a row's seeds."""

    values: List[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if self.n > 1 else None

    def as_dict(self) -> Dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


@dataclass
class Row:
    """One row of a study's table: one point of the grid, over its seeds."""

    label: str
    coords: Dict[str, str]
    cells: List[CellRecord] = field(default_factory=list)

    def stat(self, metric: str) -> Optional[Stat]:
        values = [v for v in (cell.metric(metric) for cell in self.cells) if v is not None]
        return Stat(values) if values else None

    @property
    def world_size(self) -> int:
        return self.cells[0].world_size


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return read_json(path, "a run's record") if path.is_file() else None


def load_cells(study_dir: StudyDir, plan: Dict[str, Any]) -> Dict[str, CellRecord]:
    status = study_dir.read_status()
    records = {}
    for cell in plan["cells"]:
        cell_id = cell["id"]
        cell_dir = study_dir.cell(cell_id)
        config = OmegaConf.load(cell_dir / CELL_CONFIG) if (cell_dir / CELL_CONFIG).is_file() else None
        meta = _read_json(Path(config.data_dir) / META_FILE) if config is not None else None
        results = _read_json(study_dir.results(cell_id))
        state = "done" if results is not None else status.get(cell_id, {}).get("state", "not run")
        records[cell_id] = CellRecord(
            cell_id, cell["coords"], cell["seed"], cell["nnodes"] * cell["nproc_per_node"], state,
            status.get(cell_id, {}).get("error"), results, meta, cell_dir, config, _read_json(cell_dir / COMMON_JSON),
        )  # fmt: skip
    return records


def rows(plan: Dict[str, Any], cells: Dict[str, CellRecord], axis: Optional[str] = None) -> List[Row]:
    """The table's rows in the study file's order: one per distinct point (all axes, or the
    points of `axis` alone in a one-at-a-time study), each holding its seeds' cells."""
    by_label: Dict[str, Row] = {}
    for point in plan["points"]:
        coords = point["coords"]
        if axis is not None and set(coords) != {axis}:
            continue
        label = " / ".join(coords.values()) or "base"
        row = by_label.setdefault(label, Row(label, coords))
        row.cells.append(cells[point["cell"]])
    return list(by_label.values())
