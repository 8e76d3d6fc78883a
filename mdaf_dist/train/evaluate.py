"""`mdaf evaluate --checkpoint DIR`: the validation metrics of a checkpoint, recomputed.

The run's resolved config is read from the checkpoint, the model is rebuilt and sharded for
the current world size (DCP reshards) without any optimizer, and the whole validation split is
scored (`Scorer`); the result
is printed (by rank 0) next to the metrics the checkpoint recorded when it was written. A
checkpoint that does not match its manifest is refused. The run's own files (sharding plan,
checkpoints, results) are left as they are, and the run's directory is not locked: evaluating
only reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from mdaf_dist.config import Config, load_config
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import DistEnv, distributed
from mdaf_dist.errors import UserError
from mdaf_dist.files import dumps
from mdaf_dist.train.build import build_distributed_model, data_vocab
from mdaf_dist.train.metrics import Evaluator
from mdaf_dist.train.score import Scorer


def resolve_checkpoint(checkpoint: str, best: bool = False) -> Path:
    """A checkpoint directory, or of a folder of them the latest (the best by validation AUC
    with `best`), verified against its manifest (on every rank, before anything of it is read);
    a user error otherwise."""
    if not Path(checkpoint).exists():
        raise UserError(f"no checkpoint at {checkpoint}: the path does not exist")
    path = ckpt.best_checkpoint(Path(checkpoint)) if best else ckpt.resolve(checkpoint, Path(checkpoint))
    if path is None:
        raise UserError(f"no checkpoint with a validation AUC under {checkpoint}")
    ckpt.verify(path)
    return path


def checkpoint_config(path: Path, overrides: List[str] = ()) -> Config:
    """The run's saved config, as an evaluation needs it: nothing to resume, no TensorBoard."""
    cfg = load_config(str(path / ckpt.CONFIG_FILE), overrides)
    cfg.train.resume, cfg.logging.tensorboard = "", False
    return cfg


def load_model(path: Path, cfg: Config, env: DistEnv) -> nn.Module:
    """The model of `cfg`, sharded over env's ranks, with the checkpoint's weights and no
    optimizer; nothing of the run's directory is written."""
    vocab = data_vocab(cfg)
    ckpt.check_compatible(path, cfg, vocab)
    model = build_distributed_model(cfg, vocab, env)
    ckpt.Checkpointer.load(path, model)
    return model


def evaluate_checkpoint(checkpoint: str, overrides: List[str] = (), best: bool = False) -> Optional[Dict[str, Any]]:
    """{"checkpoint", "step", "metrics" (recomputed), "recorded" (saved with the checkpoint)} on
    rank 0, None on the other ranks. Nothing of the run's directory is written."""
    path = resolve_checkpoint(checkpoint, best)
    cfg = checkpoint_config(path, overrides)
    with distributed(cfg.train.device) as env:
        metrics = Scorer(load_model(path, cfg, env), cfg, env).evaluate(Evaluator())
        if not env.is_main:
            return None
    saved = ckpt.read_trainer_state(path)
    return {"checkpoint": str(path), "step": saved["step"], "metrics": metrics, "recorded": saved["metrics"]}


def run(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.checkpoint, args.overrides, args.best)
    if result is not None:
        print(dumps(result).rstrip())
    return 0
