"""One format for every log line of the project: `logging` under the "mdaf_dist" logger, a time
stamp, the level's initial and, when more than one rank runs, the rank. Lines go to stderr through
tqdm, so that they stand above a progress bar instead of breaking it. The launcher's environment
(RANK, WORLD_SIZE: torchrun, TorchX) says which rank this process is."""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

ROOT = "mdaf_dist"


class _AboveProgressBars(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure(rank: int | None = None, world_size: int | None = None) -> None:
    """Set the project's log format (idempotent); rank and world size default to the launcher's."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    handler = _AboveProgressBars()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname).1s {prefix}%(message)s", datefmt="%Y-%m-%dT%H:%M:%S"))
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
