"""`mdaf analyze`: every table one trained model gives, from its predictions and its records.

    mdaf analyze --checkpoint RUN/checkpoints     scores the validation split first (`mdaf predict`)
    mdaf analyze --predictions preds.parquet      from predictions written earlier

Writes OUT/tables.md, OUT/tables.json (metrics; Tables 4, 5, B1, B2 when the model has a fusion
gate; Table 7 when the run's evaluations are known), OUT/gate_histogram.png and
OUT/gate_by_history_length.png, and prints the Markdown. OUT defaults to RUN/analysis for a
checkpoint and to an `analysis` folder beside the predictions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from mdaf_dist.analysis import plots
from mdaf_dist.analysis.dynamics import table7
from mdaf_dist.analysis.gate_tables import gate_tables
from mdaf_dist.analysis.predict import predict, prediction_metadata, read_predictions
from mdaf_dist.train.evaluate import checkpoint_config, resolve_checkpoint
from mdaf_dist.analysis.report import Table, write_tables
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.files import output_directory, read_json
from mdaf_dist.train.trainer import RESULTS_FILE
from mdaf_dist.train.metrics import calibration, exact_auc, gauc, logloss_from_logits

PREDICTIONS_DIR = "predictions.parquet"
# MDAF's validation AUC (Table 2), its logloss at the best epoch (Table 7), its positive share (Table 1)
PAPER_METRICS = {"AUC": 0.6007, "Log loss": 0.652, "Positive rate": 0.40}


def metrics_table(columns: Dict[str, np.ndarray], split: str) -> Table:
    logits, labels = columns["logit"], columns["label"]
    group = gauc(logits, labels, columns["user"])
    cal = calibration(logits, labels)
    rows = [
        ["Samples", int(labels.size), None],
        ["AUC", exact_auc(logits, labels), PAPER_METRICS["AUC"]],
        ["GAUC", group["gauc"], None],
        ["Log loss", logloss_from_logits(logits, labels), PAPER_METRICS["Log loss"]],
        ["Positive rate", cal["positive_rate"], PAPER_METRICS["Positive rate"]],
        ["Mean prediction", cal["mean_prediction"], None],
        ["Calibration (mean prediction / positive rate)", cal["calibration"], None],
    ]
    note = f"GAUC over {group['gauc_users']:,} users; {group['gauc_users_skipped']:,} users with one class only are skipped."
    return Table("metrics", f"Metrics of the {split} split", ["Metric", "Ours", "Paper"], rows, note)


def evaluations_of(checkpoint: Optional[Path], results: Optional[str]) -> Optional[List[Dict[str, Any]]]:
    """The run's per-epoch evaluations: from `results` if given, else from the run's results.json
    beside its checkpoints folder (the whole run: the best checkpoint only knows the epochs up to
    itself), else from the checkpoint."""
    if results:
        return read_json(results, "a run's results.json").get("evaluations")
    run_results = None if checkpoint is None else checkpoint.parent.parent / RESULTS_FILE
    if run_results is not None and run_results.is_file():
        return read_json(run_results, "the run's results.json").get("evaluations")
    if checkpoint is not None and (checkpoint / ckpt.TRAINER_FILE).is_file():
        return ckpt.read_trainer_state(checkpoint).get("evaluations")
    return None


def analyze(columns: Dict[str, np.ndarray], split: str, evaluations: Optional[List[Dict[str, Any]]], out_dir: Path) -> str:
    """Write the tables and figures of these prediction columns to `out_dir`; return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = [metrics_table(columns, split)]
    notes = []
    if "gate" in columns:
        tables += gate_tables(columns["gate"], columns["hist_len"], columns["category"])
        plots.gate_histogram(columns["gate"], out_dir / "gate_histogram.png")
        plots.gate_by_history_length(columns["gate"], columns["hist_len"], out_dir / "gate_by_history_length.png")
    else:
        notes.append("The model has no fusion gate: Tables 4, 5, B1 and B2 need one.")
    if evaluations:
        tables.append(table7(evaluations))
    else:
        notes.append("No per-epoch evaluations (pass --results RUN/results.json): Table 7 is left out.")
    text = write_tables(tables, out_dir, "tables", f"Analysis of {columns['label'].size:,} {split} predictions")
    return text + "".join(f"\n{note}\n" for note in notes)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        path = resolve_checkpoint(args.checkpoint, args.best)
        out_dir = output_directory(args.out or path.parent.parent / "analysis", "--out")
        out_dir.mkdir(parents=True, exist_ok=True)
        predictions = out_dir / PREDICTIONS_DIR
        with distributed(checkpoint_config(path, args.overrides).train.device) as env:
            predict(env, path, str(predictions), args.split, overrides=args.overrides)
        if not env.is_main:
            return 0
    else:
        predictions = Path(args.predictions)
        out_dir = output_directory(args.out or predictions.parent / "analysis", "--out")
    table = read_predictions(predictions)
    meta = prediction_metadata(predictions)
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    evaluations = evaluations_of(Path(meta["checkpoint"]), args.results)
    print(analyze(columns, meta["split"], evaluations, out_dir))
    print(f"written: {out_dir}/tables.md, tables.json" + (", gate_histogram.png, gate_by_history_length.png" if "gate" in columns else ""))
    return 0
