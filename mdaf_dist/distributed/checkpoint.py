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
        manifest.json              every file's size and SHA-256, written last

A checkpoint is written into `<root>/.tmp-step_...`, its manifest written by rank 0 once every
rank finished, and renamed only then, so a process killed in the middle of a save leaves the
previous checkpoints untouched (the temporary directory is ignored and removed by the next save).
Every load verifies the manifest first: a truncated, altered or missing file is one line, never
a model loaded from wrong bytes. `train.resume=auto` takes the newest checkpoint that verifies,
saying which newer ones it skipped and why (rank 0 decides, every rank gets its answer). The
last `keep_last` checkpoints that this run wrote or resumed from are kept, plus the best one by
validation AUC, and nothing newer than them: a damaged latest checkpoint never pushes out the
only good one.

Nothing in a checkpoint can run code when loaded: the rank files hold only tensors and plain
values (loaded with weights_only=True), DCP's `.metadata` is unpickled admitting only DCP's
metadata types (`CheckpointReader`), and the shards' non-tensor values are loaded with
weights_only=True (`_Planner`).

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

import io
import pickle
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException

from mdaf_dist.config import Config, to_dict
from mdaf_dist.distributed.env import decided_on_rank_0
from mdaf_dist.errors import UserError
from mdaf_dist.files import MANIFEST_FILE, read_json, verify_manifest, write_json, write_manifest

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
    """Checkpoints under `root` (renamed into place; `verify` tells whether they are intact),
    oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(path: Path) -> None:
    """Refuse, in one line, a checkpoint whose files differ from its manifest."""
    verify_manifest(path, "checkpoint")


def read_trainer_state(path: Path) -> Dict[str, Any]:
    return read_json(path / TRAINER_FILE, "a checkpoint's trainer state")


def _recorded_auc(path: Path) -> Optional[float]:
    try:
        return read_trainer_state(path).get("auc")
    except UserError:
        return None  # a damaged checkpoint: never the best


def best_checkpoint(root: Path) -> Optional[Path]:
    scored = [(_recorded_auc(p), p) for p in checkpoints(root)]
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
    if (path / TRAINER_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint at {resume} (expected a {PREFIX}* directory with {TRAINER_FILE}, or a folder of them)")
    return found[-1]


def newest_intact(root: Path) -> Optional[Path]:
    """The newest checkpoint under `root` that verifies (None if there is none at all); each
    newer one is skipped with a warning saying why. Refused when none verifies."""
    found = checkpoints(root)
    for path in reversed(found):
        try:
            verify(path)
            return path
        except UserError as e:
            print(f"warning: not resuming from {path.name}: {e}", file=sys.stderr, flush=True)
    if found:
        raise UserError(f"no checkpoint under {root} is intact (see the warnings above): move them away to train from the start")
    return None


# settings a run may change against its checkpoint: where it reads and writes, how long it runs,
# what it reports, how it logs, checkpoints, places the tables (DCP reshards) and pipelines its
# steps (the same losses); every other setting must match
CHANGEABLE_SETTINGS = (
    "output_dir", "data_dir", "prepare.", "train.max_epochs", "train.max_steps", "train.patience", "train.resume",
    "train.device", "train.train_auc", "train.pipeline", "loader.num_workers", "loader.eval_batch_size", "logging.", "checkpoint.", "sharding.",
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


# what DCP's .metadata is made of (read off real ones with pickletools), and torch's dtypes
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: any other global (os.system, open, eval, ...) is
    refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class CheckpointReader(dcp.FileSystemReader):
    """DCP's file-system reader, its .metadata unpickled with `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{path.parent} is not a complete checkpoint: {path.name} is missing") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{path} was refused: {e}") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UserError(f"{path} was refused: it holds a {type(metadata).__name__}, not a checkpoint's metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(dcp.DefaultLoadPlanner):
    """DCP's planner, refusing a shard's non-tensor value that is more than plain values (DCP
    itself unpickles those with weights_only=False)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"a value of {read_item.dest_index.fqn} holds objects other than tensors and plain values: not loaded") from None
        value.seek(0)
        super().load_bytes(read_item, value)


class Checkpointer:
    """Saves and loads checkpoints under `root`; `save`, `load` and `resume_point` are collectives."""

    def __init__(self, root: Path, rank: int, keep_last: int) -> None:
        if keep_last < 1:
            raise UserError(f"checkpoint.keep_last must be at least 1, got {keep_last}")
        self.root, self.rank, self.keep_last = Path(root), rank, keep_last
        # checkpoints this run wrote or verified when it resumed: the only ones pruning counts
        self.trusted: List[Path] = []

    def resume_point(self, resume: str) -> Optional[Path]:
        """`train.resume` resolved (`resolve`) and verified: with "auto" the newest intact
        checkpoint (`newest_intact`), a named one refused if it does not verify."""

        def decide() -> Optional[Path]:
            if resume == "auto":
                return newest_intact(self.root)
            path = resolve(resume, self.root)
            if path is not None:
                verify(path)
            return path

        path = decided_on_rank_0(decide)
        if path is not None:
            self.trusted.append(path)
        return path

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
            write_json(tmp / TRAINER_FILE, snapshot.trainer)
        _barrier()
        if self.rank == 0:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.trusted.append(final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        """Remove checkpoints older than the last `keep_last` trusted ones, except the best."""
        kept = sorted(set(self.trusted))[-self.keep_last :]
        self.trusted = kept
        best = best_checkpoint(self.root)
        for path in checkpoints(self.root):
            if path.name < kept[0].name and path != best:
                shutil.rmtree(path)

    @staticmethod
    def load(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Load model (and optimizer) state in place, resharding to the current layout. The
        optimizer's state must exist before loading (KeyedOptimizer.init_state)."""
        state: Dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        reader = CheckpointReader(path)
        # refused here, where the one line reaches the user: DCP would swallow it and fall back
        reader.read_metadata()
        try:
            dcp.load(state, storage_reader=reader, planner=_Planner())
        except CheckpointException as e:
            refused = [failure[0] for failure in e.failures.values() if isinstance(failure[0], UserError)]
            if refused:
                raise refused[0] from None
            raise
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
