"""`mdaf compare RUN_OR_STUDY ...`: one table across training runs and the cells of studies.

A row per run (a directory with results.json, i.e. a training run's output_dir or a study cell):
its metrics, its wall time, and the settings in which the runs differ (where the runs were
written, NOT_SETTINGS, left out). A study directory stands for all its cells. The
settings are read from the run's config.yaml (a study cell's), else from its newest checkpoint's.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from mdaf_dist.distributed.checkpoint import CONFIG_FILE, checkpoints
from mdaf_dist.errors import UserError
from mdaf_dist.files import read_json
from mdaf_dist.studies.workdir import PLAN_FILE, StudyDir
from mdaf_dist.train.trainer import RESULTS_FILE

# (column, where in results.json, digits)
METRICS = (
    ("auc", ("valid", "auc"), 4),
    ("logloss", ("valid", "logloss"), 4),
    ("best_auc", ("best_auc",), 4),
    ("best_epoch", ("best_epoch",), 0),
    ("steps", ("steps",), 0),
    ("wall_s", ("wall_seconds",), 1),
    ("samples/s", ("samples_per_sec",), 0),
)
# where a run was written, not what it did
NOT_SETTINGS = ("output_dir", "data_dir", "logging.tensorboard_dir")


def run_dirs(paths: List[str]) -> Dict[str, Path]:
    """label -> run directory, for each path: a run, or a study (each of its cells)."""
    runs: Dict[str, Path] = {}
    for path in map(Path, paths):
        if (path / PLAN_FILE).is_file():
            study = StudyDir(path)
            for cell in study.read_plan()["cells"]:
                runs[f"{path.name}/{cell['id']}"] = study.cell(cell["id"])
        elif (path / RESULTS_FILE).is_file():
            runs[path.name if path.name not in runs else str(path)] = path
        else:
            raise UserError(f"{path} is neither a training run (no {RESULTS_FILE}) nor a study directory (no {PLAN_FILE})")
    return runs


def settings(run_dir: Path) -> Dict[str, Any]:
    """The run's resolved config, flattened to dotted keys; empty when none was saved."""
    saved = [run_dir / CONFIG_FILE] + [c / CONFIG_FILE for c in reversed(checkpoints(run_dir / "checkpoints"))]
    path = next((p for p in saved if p.is_file()), None)
    if path is None:
        return {}
    flat: Dict[str, Any] = {}

    def walk(tree: Any, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(OmegaConf.load(path)), "")
    return flat


def _metric(results: Optional[Dict[str, Any]], where: tuple, digits: int) -> str:
    value: Any = results
    for key in where:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if digits else f"{value:,.0f}" if isinstance(value, float) else str(value)


def table(paths: List[str]) -> List[List[str]]:
    """Header and one row per run: name, metrics, then the settings that differ."""
    runs = run_dirs(paths)
    results = {name: read_json(d / RESULTS_FILE, "a run's results") if (d / RESULTS_FILE).is_file() else None for name, d in runs.items()}
    configs = {name: settings(d) for name, d in runs.items()}
    keys = sorted({k for c in configs.values() for k in c} - set(NOT_SETTINGS))
    # a run without a saved config (a cell that failed before) makes no setting differ
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs.values() if c}) > 1]
    header = ["run", *(name for name, _, _ in METRICS), *differing]
    rows = [
        [name, *(_metric(results[name], where, digits) for _, where, digits in METRICS), *(str(configs[name].get(k, "")) for k in differing)]
        for name in runs
    ]
    return [header, *rows]


def markdown(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def to_csv(rows: List[List[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().rstrip("\n")


def run(args: argparse.Namespace) -> int:
    rows = table(args.paths)
    print(markdown(rows) if args.format == "markdown" else to_csv(rows))
    return 0
