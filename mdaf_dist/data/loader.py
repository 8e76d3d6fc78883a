"""The streaming loader: Parquet sample row groups + memory-mapped events -> `Batch`.

How the work is split (DESIGN.md 3), and why:

* Ranks. The split's row groups, in file order or (when shuffling) in an order permuted by
  (seed, epoch), are laid end to end as one sequence of N rows; rank r takes rows
  [r N / W, (r + 1) N / W). Every sample goes to exactly one rank and ranks differ by at most
  one sample however few or uneven the row groups are (a row group on a boundary is read by
  both neighbours, each keeping its own slice), so ranks run out within one batch of each other.
* Shuffle windows. A rank's rows are cut into consecutive windows of `shuffle_buffer` rows
  (rounded up to whole batches); each window is permuted by (seed, epoch, rank, window) and
  emitted as batches. This is a shuffle buffer whose windows are independent, so a resumed run
  jumps straight to its window instead of replaying the buffer from the start of the epoch.
  Mixing reaches across at most one window plus the row-group permutation: keep the buffer at
  least as large as the row groups `mdaf prepare` writes.
* DataLoader workers. Batch j of a rank's stream is built by worker j mod num_workers.
  PyTorch's DataLoader collects results from its workers round-robin, so the rank's batches
  arrive in stream order whatever the number of workers, and the only position to remember is
  how many batches this rank has yielded. The price: each worker decodes and permutes every
  window (about 0.2 us per row and worker) but gathers histories, the dominant cost (about
  1.5 us per sample with 50-click histories), only for its own batches.

Histories are never stored: each batch gathers its samples' last L clicks before `pos` from
the memory-mapped events with a handful of whole-batch numpy calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import LoaderConfig
from mdaf_dist.data.batch import Batch, feature_keys
from mdaf_dist.data.layout import Events, open_events, sample_files
from mdaf_dist.errors import UserError

# Sample columns the loader reads (pos only to find the history; ts is not a feature).
COLUMNS = ("user", "pos", "item", "category", "label")


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    num_rows: int


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group (indexes into the split's row-group list)."""

    row_group: int
    start: int
    stop: int


def row_groups(data_dir: str | Path, split: str) -> List[RowGroup]:
    """The split's row groups in file order, from the Parquet footers only."""
    groups = []
    for path in sample_files(data_dir, split):
        metadata = pq.ParquetFile(path).metadata
        groups += [RowGroup(str(path), i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
    return groups


def num_samples(data_dir: str | Path, split: str) -> int:
    """Rows of one split, from Parquet metadata (nothing is decoded)."""
    return sum(group.num_rows for group in row_groups(data_dir, split))


def rank_pieces(sizes: List[int], order: np.ndarray, rank: int, world_size: int) -> List[Piece]:
    """Rank `rank`'s contiguous share of the rows of the row groups laid end to end in `order`."""
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64)[order])
    total = int(ends[-1]) if len(ends) else 0
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    pieces = []
    for group, end in zip(order.tolist(), ends.tolist()):
        begin = end - sizes[group]
        if begin < hi and end > lo:
            pieces.append(Piece(group, max(lo, begin) - begin, min(hi, end) - begin))
    return pieces


def history_indices(
    user_offsets: np.ndarray, user: np.ndarray, pos: np.ndarray, history_length: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Event indices of every sample's last `history_length` clicks before `pos`, oldest first,
    concatenated over the batch, and the per-sample lengths: events[off + max(0, pos - L): off + pos]."""
    lengths = np.minimum(pos, history_length).astype(np.int64)
    starts = user_offsets[user] + pos - lengths
    # index k of the output belongs to sample s: starts[s] + (k - first output index of s)
    shift = starts - (np.cumsum(lengths) - lengths)
    indices = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(shift, lengths)
    return indices, lengths


def make_batch(columns: Dict[str, np.ndarray], events: Events, history_length: int, history_categories: bool) -> Batch:
    """One `Batch` from sample columns: one id each for user/item/category, then the histories."""
    user, pos = columns["user"], columns["pos"]
    size = len(user)
    # asarray: index the offsets as a plain array, not through np.memmap's subclass machinery
    indices, lengths = history_indices(np.asarray(events.user_offsets), user, pos, history_length)
    total = len(indices)
    history_columns = [events.item] + ([events.category] if history_categories else [])
    values = np.empty(3 * size + total * len(history_columns), dtype=np.int64)
    values[:size], values[size : 2 * size], values[2 * size : 3 * size] = user, columns["item"], columns["category"]
    for k, column in enumerate(history_columns):
        values[3 * size + k * total : 3 * size + (k + 1) * total] = column[indices]
    all_lengths = np.ones((3 + len(history_columns)) * size, dtype=np.int32)
    all_lengths[3 * size :] = np.tile(lengths, len(history_columns))
    features = KeyedJaggedTensor(
        keys=feature_keys(history_categories), values=torch.from_numpy(values), lengths=torch.from_numpy(all_lengths), stride=size
    )
    return Batch(features, torch.from_numpy(columns["label"].astype(np.float32)))


class SampleStream(IterableDataset):
    """One rank's batches of one split and epoch, from batch `start_batch` on (see the module doc)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        *,
        batch_size: int,
        history_length: int,
        history_categories: bool,
        shuffle: bool,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        start_batch: int,
    ) -> None:
        # no defaults: `StreamingLoader` passes every setting from LoaderConfig, the one source of them
        if batch_size < 1 or history_length < 0:
            raise ValueError(f"need batch_size >= 1 and history_length >= 0, got {batch_size} and {history_length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.data_dir, self.split = str(data_dir), split
        self.batch_size, self.history_length = batch_size, history_length
        self.history_categories = history_categories
        self.shuffle, self.seed, self.epoch, self.rank = shuffle, seed, epoch, rank
        self.start_batch = start_batch
        self.groups = row_groups(data_dir, split)
        sizes = [group.num_rows for group in self.groups]
        order = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
        self.pieces = rank_pieces(sizes, order, rank, world_size)
        # where each piece ends and starts in this rank's row sequence
        self.piece_ends = np.cumsum([piece.stop - piece.start for piece in self.pieces], dtype=np.int64)
        self.piece_starts = self.piece_ends - [piece.stop - piece.start for piece in self.pieces]
        self.num_rows = int(self.piece_ends[-1]) if self.pieces else 0
        self.window_batches = max(1, math.ceil(shuffle_buffer / batch_size))
        whole, partial = divmod(self.num_rows, batch_size)
        self.num_batches = whole + (1 if partial and not drop_last else 0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        events = open_events(self.data_dir)
        reader = _RowGroupReader(self.groups)
        window, order = -1, None
        for batch in range(self.start_batch + worker, self.num_batches, num_workers):
            if batch // self.window_batches != window:
                window = batch // self.window_batches
                columns, order = self._window(reader, window)
            offset = (batch - window * self.window_batches) * self.batch_size
            rows = order[offset : offset + self.batch_size]
            selected = {name: values[rows] for name, values in columns.items()}
            yield make_batch(selected, events, self.history_length, self.history_categories)

    def _window(self, reader: "_RowGroupReader", window: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        """The columns of rows [window start, window end) and the order to emit them in."""
        lo = window * self.window_batches * self.batch_size
        hi = min(lo + self.window_batches * self.batch_size, self.num_rows)
        first = int(np.searchsorted(self.piece_ends, lo, side="right"))
        last = int(np.searchsorted(self.piece_ends, hi, side="left"))
        parts = []
        for k in range(first, last + 1):
            piece, shift = self.pieces[k], self.pieces[k].start - int(self.piece_starts[k])
            a, b = max(lo + shift, piece.start), min(hi + shift, piece.stop)
            parts.append({name: values[a:b] for name, values in reader.read(piece.row_group).items()})
        if len(parts) == 1:
            columns = parts[0]
        else:
            columns = {name: np.concatenate([part[name] for part in parts]) for name in COLUMNS}
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, self.rank, window]).permutation(hi - lo)
        else:
            order = np.arange(hi - lo)
        return columns, order


class _RowGroupReader:
    """Decodes row groups, keeping the last one: consecutive windows share their boundary group."""

    def __init__(self, groups: List[RowGroup]) -> None:
        self.groups = groups
        self.files: Dict[str, pq.ParquetFile] = {}
        self.cached: Tuple[int, Optional[Dict[str, np.ndarray]]] = (-1, None)

    def read(self, group: int) -> Dict[str, np.ndarray]:
        if self.cached[0] != group:
            info = self.groups[group]
            if info.path not in self.files:
                self.files[info.path] = pq.ParquetFile(info.path, memory_map=True)
            # one thread: DataLoader workers are the parallelism
            table = self.files[info.path].read_row_group(info.index, columns=list(COLUMNS), use_threads=False)
            self.cached = (group, {name: table.column(name).to_numpy() for name in COLUMNS})
        return self.cached[1]


def worker_seed_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from. Without one it draws from
    the global torch generator, which belongs to the model (dropout): a resumed run, starting a
    loader mid-epoch, would shift every dropout mask after it."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


class StreamingLoader:
    """Iterable of `Batch` for one rank, with a resumable position.

    The position is (epoch, batches this rank has yielded in it). A completed pass moves on to the
    next epoch, so `for epoch ...: for batch in loader` reshuffles each time, and a state saved
    after a pass resumes at the start of the next epoch. Ranks in lockstep hold the same position.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        cfg: LoaderConfig,
        *,
        history_length: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        epoch: int,
        batch_size: int,
        pin_memory: bool,
    ) -> None:
        self.data_dir, self.split, self.cfg, self.history_length = str(data_dir), split, cfg, history_length
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batch_size, self.pin_memory = batch_size, pin_memory
        self.epoch, self.position = epoch, 0

    def _stream(self, start_batch: int) -> SampleStream:
        cfg = self.cfg
        return SampleStream(
            self.data_dir, self.split, batch_size=self.batch_size, history_length=self.history_length,
            history_categories=cfg.history_categories, shuffle=self.shuffle, shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
            drop_last=cfg.drop_last and self.split == "train", start_batch=start_batch,
        )  # fmt: skip

    def __len__(self) -> int:
        """Batches in a whole epoch of this rank (a resumed epoch yields fewer)."""
        return len(self._stream(0))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        stream = self._stream(self.position)
        workers = min(self.cfg.num_workers, max(0, len(stream) - self.position))
        loader = DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
            generator=worker_seed_generator(self.cfg.seed, self.epoch, self.rank),
        )  # fmt: skip
        for batch in loader:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches": self.position,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume where `state` was saved; the position counts batches of one rank, so it is only
        meaningful for the same world size and batch size."""
        saved = (state["world_size"], state["batch_size"])
        if saved != (self.world_size, self.batch_size):
            raise ValueError(
                f"loader state was saved with world size {saved[0]} and batch size {saved[1]}; "
                f"this loader has {self.world_size} and {self.batch_size}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])


def check_settings(cfg: LoaderConfig) -> None:
    """Refuse a non-positive size in one line naming the setting."""
    for key in ("batch_size", "eval_batch_size", "shuffle_buffer"):
        if getattr(cfg, key) < 1:
            raise UserError(f"loader.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_workers < 0:
        raise UserError(f"loader.num_workers must be >= 0, got {cfg.num_workers}")


def make_loader(
    data_dir: str | Path,
    split: str,
    cfg: LoaderConfig,
    *,
    history_length: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    epoch: int = 0,
    batch_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> StreamingLoader:
    """The loader the trainer iterates, gathering the last `history_length` clicks (the
    model's) of each sample: `batch_size` defaults to cfg.batch_size for train and
    cfg.eval_batch_size otherwise; batches land in pinned memory when `device` is CUDA."""
    check_settings(cfg)
    if batch_size is None:
        batch_size = cfg.batch_size if split == "train" else cfg.eval_batch_size
    pin = device is not None and torch.device(device).type == "cuda"
    return StreamingLoader(
        data_dir, split, cfg, history_length=history_length, rank=rank, world_size=world_size, shuffle=shuffle, epoch=epoch,
        batch_size=batch_size, pin_memory=pin,
    )  # fmt: skip
