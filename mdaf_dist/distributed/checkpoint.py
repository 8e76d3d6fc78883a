"""Checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards.

    <root>/step_00000120/          one checkpoint
        .metadata, __*_*.distcp    DCP: model (sharded tables as ShardedTensors, dense tensors)
                                   and optimizer state (AdamW + the fused tables' state)
        rank_00000.pt ...          per rank: loader position, RNG states and the current epoch's
                                   train-AUC rows (tensors and plain values only: loaded with
                                   weights_only=True)
        trainer.json               step, epoch, best AUC so far, this checkpoint's metrics, world
                                   size, table sizes
        config.yaml                the resolved config of the run
        sharding_plan.{json,txt}   the plan the shards were written under

A checkpoint is written into `<root>/.tmp-step_...` and renamed only after every rank finished,
so a process killed in the middle of a save leaves the previous checkpoints untouched (the
temporary directory is ignored and removed by the next save). The last `keep_last` checkpoints
are kept, plus the best one by validation AUC.

Resharding: DCP loads the saved tensors into whatever sharding the loading run has, so a
checkpoint written by N ranks resumes on M. The per-rank files cannot be remapped to another
world size: the loader position counts batches of one rank's slice of the data, so a run resumed
at a different world size restarts the checkpoint's epoch from its beginning (samples of that
epoch seen before the checkpoint are seen again, none are skipped, and the trainer warns how
many; a checkpoint written at the end of an epoch resumes at the next epoch's start, exactly),
RNG streams are reseeded from (seed, step, rank), and the epoch's train-AUC rows start empty.

A checkpoint is loaded only into a run of the same settings (`check_compatible`), so that a
changed model or data set is one line naming the differences, not a DCP size mismatch.
"""

from __future__ import annotations

import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn

from mdaf_dist.config import Config, to_dict
from mdaf_dist.errors import UserError
from mdaf_dist.files import dumps, read_json

TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> Dict[str, Any]:
    """Every RNG stream of this process as tensors and plain values (numpy's and Python's
    Mersenne Twister keys as int64 tensors), so that a rank file loads with weights_only=True."""
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Snapshot:
    """What a save writes besides model and optimizer: `local` differs per rank, `trainer` is
    the same on every rank, `files` are small text files (config, plan) written by rank 0."""

    trainer: Dict[str, Any]
    local: Dict[str, Any]
    files: Dict[str, str]


def checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / TRAINER_FILE).is_file())


def read_trainer_state(path: Path) -> Dict[str, Any]:
    return read_json(path / TRAINER_FILE, "a checkpoint's trainer state")


def best_checkpoint(root: Path) -> Optional[Path]:
    scored = [(read_trainer_state(p).get("auc"), p) for p in checkpoints(root)]
    scored = [(auc, p) for auc, p in scored if auc is not None and auc == auc]
    return max(scored, key=lambda item: item[0])[1] if scored else None


def resolve(resume: str, root: Path) -> Optional[Path]:
    """`train.resume`: "" -> None; "auto" -> the latest checkpoint under root, if any; else a
    checkpoint directory, or a root of checkpoints (its latest)."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if (path / TRAINER_FILE).is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint at {resume} (expected a {PREFIX}* directory with {TRAINER_FILE}, or a folder of them)")
    return found[-1]


# settings a run may change against its checkpoint: where it reads and writes, how long it runs,
# what it reports, how it logs, checkpoints and places the tables (DCP reshards); every other
# setting must match
CHANGEABLE_SETTINGS = (
    "output_dir", "data_dir", "prepare.", "train.max_epochs", "train.max_steps", "train.patience", "train.resume",
    "train.device", "train.train_auc", "loader.num_workers", "loader.eval_batch_size", "logging.", "checkpoint.", "sharding.",
)  # fmt: skip


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"model": {"dropout": 0.1}} -> {"model.dropout": 0.1}"""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _effective(flat: Dict[str, Any]) -> Dict[str, Any]:
    """Settings as they act: an unset train.embedding_lr is train.lr, so a checkpoint that spelled
    out the same rate (or predates the default) is the same run."""
    if flat.get("train.embedding_lr") is None:
        flat["train.embedding_lr"] = flat.get("train.lr")
    return flat


def check_compatible(path: Path, cfg: Config, vocab: Dict[str, int]) -> None:
    """Refuse, before DCP meets tensors of other shapes, a checkpoint written under other settings
    (those not in CHANGEABLE_SETTINGS) or with other table sizes, naming each difference."""
    saved = _effective(_flat(OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE))))
    current = _effective(_flat(to_dict(cfg)))
    differ = [
        f"{key}={current[key]!r} (checkpoint: {saved[key]!r})"
        for key in current
        if key in saved and current[key] != saved[key] and not key.startswith(CHANGEABLE_SETTINGS)
    ]
    saved_vocab = read_trainer_state(path).get("vocab")
    if saved_vocab is not None and saved_vocab != vocab:
        differ.append(f"table rows {vocab} (checkpoint: {saved_vocab})")
    if differ:
        raise UserError(f"{path} was written with other settings: {'; '.join(differ)}")


class Checkpointer:
    """Saves and loads checkpoints under `root`; `save` and `load` are collectives."""

    def __init__(self, root: Path, rank: int, keep_last: int) -> None:
        if keep_last < 1:
            raise UserError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
        self.root, self.rank, self.keep_last = Path(root), rank, keep_last

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, snapshot: Snapshot) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            for stale in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        torch.save(snapshot.local, tmp / rank_file(self.rank))
        if self.rank == 0:
            for name, text in snapshot.files.items():
                (tmp / name).write_text(text)
            (tmp / TRAINER_FILE).write_text(dumps(snapshot.trainer))
        _barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        found = checkpoints(self.root)
        keep = set(found[-self.keep_last :])
        best = best_checkpoint(self.root)
        if best is not None:
            keep.add(best)
        for path in found:
            if path not in keep:
                shutil.rmtree(path)

    @staticmethod
    def load(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Load model (and optimizer) state in place, resharding to the current layout. The
        optimizer's state must exist before loading (KeyedOptimizer.init_state)."""
        state: Dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])

    @staticmethod
    def load_local(path: Path, rank: int, world_size: int) -> Optional[Dict[str, Any]]:
        """This rank's loader/RNG/train-AUC state, or None when the checkpoint has another world size."""
        if read_trainer_state(path)["world_size"] != world_size:
            return None
        file = path / rank_file(rank)
        try:
            # tensors and plain values only: unpickling anything else could run arbitrary code
            return torch.load(file, weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{file} holds objects other than tensors and plain values: not loaded") from None
