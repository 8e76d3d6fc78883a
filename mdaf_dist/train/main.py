"""`mdaf train` and `python -m mdaf_dist.train`: one `main` for both, so torchrun/TorchX and the
console script run the same code. Each rank is one process; the launcher's environment says
which (see mdaf_dist/distributed/env.py). Rank 0 holds a lock on output_dir for the run's
lifetime, so a second run there is refused (naming the holder) instead of mixing its files into
this one's; it writes the run's summary to <output_dir>/results.json (see `Trainer.results`)
and prints its headline numbers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from mdaf_dist.config import load_config
from mdaf_dist.distributed.env import decided_on_rank_0, distributed
from mdaf_dist.errors import UserError, one_line
from mdaf_dist.files import DirectoryLock, finite, output_directory
from mdaf_dist.train.build import EMBEDDING_BACKENDS
from mdaf_dist.train.trainer import RESULTS_FILE, Trainer


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", help="YAML config (e.g. configs/smoke.yaml); repeat to overlay files in order")
    parser.add_argument("--embedding-backend", choices=EMBEDDING_BACKENDS, default="torchrec", help="plain: unsharded reference, one process")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_epochs=1 sharding.tables.item=row_wise")


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
            results = Trainer(cfg, env, embedding_backend=args.embedding_backend).fit()
        finally:
            lock.release()
        if env.is_main:
            summary = {key: results["valid"].get(key) for key in ("auc", "logloss", "num_samples")}
            summary.update({key: results[key] for key in ("best_auc", "best_epoch", "epochs", "steps")})
            print(json.dumps(finite(summary), allow_nan=False))
            print(f"results: {Path(cfg.output_dir) / RESULTS_FILE}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdaf_dist.train", description="train MDAF (one process per rank)")
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (UserError, OSError) as e:
        print(f"mdaf train: error: {one_line(e)}", file=sys.stderr)
        return 2
