"""`mdaf train` and `python -m mdaf_dist.train`: one handler for both (its arguments are in
mdaf_dist/cli.py), so torchrun/TorchX and the console script run the same code. Each rank is one process; the launcher's environment says
which (see mdaf_dist/distributed/env.py). Rank 0 holds a lock on output_dir for the run's
lifetime, so a second run there is refused (naming the holder) instead of mixing its files into
this one's; it writes the run's summary to <output_dir>/results.json (see `Trainer.results`),
prints its headline numbers and hands them to TorchX's tracker API, which records them where a
tracker is configured (TORCHX_TRACKERS, e.g. from .torchxconfig's [torchx:tracker]; MLflow or
fsspec) and does nothing where none is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from mdaf_dist.config import load_config
from mdaf_dist.distributed.env import decided_on_rank_0, distributed
from mdaf_dist.errors import UserError
from mdaf_dist.files import DirectoryLock, finite, output_directory
from mdaf_dist.models.optfusion import stages
from mdaf_dist.train.trainer import RESULTS_FILE, Trainer


def track(summary: Dict[str, Any]) -> None:
    """The run's numbers to the TorchX trackers of this job (none configured: nothing)."""
    from torchx.tracker import app_run_from_env

    app_run_from_env().add_metadata(**finite(summary))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.data_dir:
        raise UserError("data_dir is empty: give a prepared data directory (`mdaf prepare`'s output) in the config or as data_dir=PATH")
    cfg.output_dir = str(output_directory(cfg.output_dir, "output_dir"))
    with distributed(cfg.train.device) as env:
        lock = DirectoryLock(cfg.output_dir)

        def claim_output_dir() -> None:
            lock.acquire()

        decided_on_rank_0(claim_output_dir)
        try:
            # one run, or OptFusion's search then its re-train (model.optfusion_stage=search_retrain)
            for stage in stages(cfg):
                results = Trainer(stage, env, embedding_backend=args.embedding_backend).fit()
        finally:
            lock.release()
        if env.is_main:
            summary = {key: results["valid"].get(key) for key in ("auc", "logloss", "num_samples")}
            summary.update({key: results[key] for key in ("best_auc", "best_epoch", "epochs", "steps")})
            print(json.dumps(finite(summary), allow_nan=False))
            track({**summary, "wall_seconds": results["wall_seconds"]})
            print(f"results: {Path(cfg.output_dir) / RESULTS_FILE}")
    return 0
