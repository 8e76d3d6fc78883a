"""The common evaluation set: one prepared validation split that every cell's best checkpoint is
also scored on (`mdaf predict --data`), so rows that train on different data (filters, user
fractions) are compared on the same samples (DESIGN 8).

Which data: the study file's `evaluate_on` (prepare.* overrides) over the study's base config
(its config files and overrides and the command line's, no axis value). Without `evaluate_on`
that is the base config's own data: the paper's protocol (configs/paper.yaml) on the study's
input and users, so in studies whose axes leave the data alone (Tables 2, 3, A1) every cell is
scored on the validation split it trained against, and the common AUC is its own.

    DIR/cells/<id>/common.parquet/   the cell's predictions on the common set (for DeLong)
    DIR/cells/<id>/common.json       their metrics, written last: a cell that has one is skipped
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional

from mdaf_dist.config import Config, load_config
from mdaf_dist.files import write_json
from mdaf_dist.studies.grid import Plan, shared_overrides
from mdaf_dist.studies.workdir import LOG_FILE, StudyDir

COMMON_JSON = "common.json"
COMMON_PREDICTIONS = "common.parquet"


def common_config(plan: Plan) -> Config:
    """The config whose prepared data (prepare.*, model.history_length) is the study's common
    evaluation set."""
    study = plan.study
    return load_config(study.file.configs, [*shared_overrides(study, plan.overrides), *study.file.evaluate_on])


def score_cell(cell_dir: Path, data_dir: Path) -> Dict[str, Any]:
    """Score the cell's best checkpoint on the validation split of `data_dir` and write its
    predictions and COMMON_JSON; returns what COMMON_JSON holds."""
    # torch and the models only when a cell is scored
    from mdaf_dist.analysis.predict import predict
    from mdaf_dist.distributed.env import distributed
    from mdaf_dist.train.evaluate import checkpoint_config, resolve_checkpoint

    path = resolve_checkpoint(str(cell_dir / "checkpoints"), best=True)
    with distributed(checkpoint_config(path).train.device) as env:
        meta = predict(env, path, str(cell_dir / COMMON_PREDICTIONS), "valid", str(data_dir))
    record = {
        "data_dir": str(data_dir),
        "checkpoint": meta["checkpoint"],
        "step": meta["step"],
        "samples": meta["num_samples"],
        "auc": meta["metrics"]["auc"],
        "logloss": meta["metrics"]["logloss"],
        "unseen_ids": meta["unseen_ids"],
    }
    write_json(cell_dir / COMMON_JSON, record)
    return record


def score_cells(plan: Plan, study_dir: StudyDir, data_dir: Path) -> Dict[str, Optional[str]]:
    """Score every trained cell that has no COMMON_JSON yet; returns, per cell scored now, None
    or the error that kept it from being scored (also in the study log)."""
    errors: Dict[str, Optional[str]] = {}
    for cell in plan.cells:
        cell_dir = study_dir.cell(cell.id)
        if not study_dir.results(cell.id).is_file() or (cell_dir / COMMON_JSON).is_file():
            continue
        try:
            # the model's set-up lines and library warnings go to the study log, as prepare's do
            with open(study_dir.root / LOG_FILE, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                record = score_cell(cell_dir, data_dir)
        except Exception as e:  # noqa: BLE001 - recorded; the other cells are still scored
            errors[cell.id] = f"common evaluation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            study_dir.log(f"{errors[cell.id]} ({cell.id})")
            continue
        errors[cell.id] = None
        study_dir.log(f"scored {cell.id} on the common set: auc {record['auc']:.4f} on {record['samples']} samples")
        print(f"common evaluation set: {cell.id} auc {record['auc']:.4f} ({record['samples']:,} samples)", flush=True)
    return errors
