"""A study's output directory: what lives where, which study owns it, and its log.

    DIR/study.json          the plan (cells, their coordinates and seeds) and who owns DIR
    DIR/study.log           every step taken: prepare / reuse data, launch, skip, done, failed
    DIR/status.json         each cell's last state, seconds and error
    DIR/input/              synthetic input (when the study file has `synth`)
    DIR/data/<key>/         one prepared directory per distinct prepare config
    DIR/cells/<cell-id>/    one training run: config.yaml, results.json, checkpoints, error.txt
    DIR/report/             the report and its plots
    DIR/tensorboard/<cell-id>/  each cell's TensorBoard events (`tensorboard --logdir DIR/tensorboard`)

A directory is claimed by one study and one set of command-line overrides; running another
study (or the same one with other overrides) into it is refused, so no run mixes into or
deletes another's cells.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

from mdaf_dist.errors import UserError
from mdaf_dist.files import read_json, write_json
from mdaf_dist.train.trainer import RESULTS_FILE

PLAN_FILE = "study.json"
LOG_FILE = "study.log"
STATUS_FILE = "status.json"
ERROR_FILE = "error.txt"
CELL_CONFIG = "config.yaml"


class StudyDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    # -- layout ----------------------------------------------------------------------------
    def cell(self, cell_id: str) -> Path:
        return self.root / "cells" / cell_id

    def results(self, cell_id: str) -> Path:
        return self.cell(cell_id) / RESULTS_FILE

    def data(self, key: str) -> Path:
        return self.root / "data" / key

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    # -- ownership -------------------------------------------------------------------------
    def read_plan(self) -> Dict[str, Any]:
        path = self.root / PLAN_FILE
        if not path.is_file():
            raise UserError(f"{self.root} holds no study (no {PLAN_FILE}): run `mdaf study run STUDY.yaml --out {self.root}` first")
        return read_json(path, "a study's plan")

    def claim(self, plan: Dict[str, Any]) -> None:
        """Write the plan, unless DIR holds something else: another study, the same study with
        other overrides, or files that are not a study's."""
        path = self.root / PLAN_FILE
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not a study directory: choose another --out")
        if path.is_file():
            owner = read_json(path, "a study's plan")
            if owner["name"] != plan["name"]:
                raise UserError(f"{self.root} holds another study ({owner['name']!r}): choose another --out for {plan['name']!r}")
            if owner["overrides"] != plan["overrides"]:
                raise UserError(
                    f"{self.root} holds study {plan['name']!r} run with overrides {owner['overrides']}, not {plan['overrides']}: "
                    "choose another --out"
                )
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise UserError(f"{self.root} is not empty and holds no study: choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(path, plan)

    # -- records ---------------------------------------------------------------------------
    def log(self, line: str) -> None:
        with open(self.root / LOG_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    def read_status(self) -> Dict[str, Dict[str, Any]]:
        path = self.root / STATUS_FILE
        return read_json(path, "a study's cell states") if path.is_file() else {}

    def write_status(self, status: Dict[str, Dict[str, Any]]) -> None:
        write_json(self.root / STATUS_FILE, status)
