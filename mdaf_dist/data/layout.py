"""The prepared-data directory: the one contract between `mdaf prepare` and the loader.

    DIR/meta.json              vocab sizes, row counts per stage, settings, versions, and under
                               "files" every other file's size and SHA-256 (written last: a
                               directory without it, or whose files differ, is refused)
    DIR/events.arrow           click events sorted by (user, ts, original order); columns item,
                               category, ts (int32); one record batch, so it memory-maps as
                               contiguous arrays
    DIR/user_offsets.npy       int64 [num_users + 1]: user u's clicks are
                               events[user_offsets[u]:user_offsets[u + 1]] (user 0 = padding, empty)
    DIR/samples/{train,valid[,test]}/part-*.parquet
                               one row per CTR sample (SAMPLE_SCHEMA); its history is the
                               user's clicks before local position `pos`: events[off + max(0, pos - L): off + pos]

    DIR/vocab/{user,item,category}.npy, DIR/rejects.csv (`mdaf prepare`)

Ids are dense: 0 is reserved for padding/unknown in every table, so vocab sizes include it.
`mdaf prepare` owns the entries in PREPARED_ENTRIES and replaces them as a whole; anything else
in the directory is the user's and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from mdaf_dist.data.vocab import VOCAB_DIR
from mdaf_dist.errors import UserError
from mdaf_dist.files import manifest, read_json, verify_files, write_json

META_FILE = "meta.json"
EVENTS_FILE = "events.arrow"
OFFSETS_FILE = "user_offsets.npy"
SAMPLES_DIR = "samples"
REJECTS_FILE = "rejects.csv"
# in time order: the split codes of `samples.assign_split` index it
SPLITS = ("train", "valid", "test")
# what `mdaf prepare` writes (the vocab directory and the rejects file included)
PREPARED_ENTRIES = (META_FILE, EVENTS_FILE, OFFSETS_FILE, SAMPLES_DIR, VOCAB_DIR, REJECTS_FILE)

EVENT_SCHEMA = pa.schema([("item", pa.int32()), ("category", pa.int32()), ("ts", pa.int32())])
SAMPLE_SCHEMA = pa.schema(
    [
        ("user", pa.int32()),
        ("pos", pa.int32()),
        ("item", pa.int32()),
        ("category", pa.int32()),
        ("label", pa.int8()),
        ("ts", pa.int32()),
    ]
)


@dataclass
class Events:
    """Per-user click histories, memory-mapped (read) or in memory (write)."""

    item: np.ndarray
    category: np.ndarray
    ts: np.ndarray
    user_offsets: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.user_offsets) - 1


def write_events(out_dir: str | Path, events: Events) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = pa.record_batch(
        [pa.array(events.item, pa.int32()), pa.array(events.category, pa.int32()), pa.array(events.ts, pa.int32())],
        schema=EVENT_SCHEMA,
    )
    with pa.OSFile(str(out / EVENTS_FILE), "wb") as sink, ipc.new_file(sink, EVENT_SCHEMA) as writer:
        writer.write_batch(batch)
    np.save(out / OFFSETS_FILE, np.asarray(events.user_offsets, dtype=np.int64))


def open_events(data_dir: str | Path) -> Events:
    """Memory-map the events: nothing is read until a history is gathered."""
    d = Path(data_dir)
    source = pa.memory_map(str(d / EVENTS_FILE), "r")
    batch = ipc.open_file(source).get_batch(0)
    arrays = [batch.column(name).to_numpy(zero_copy_only=True) for name in EVENT_SCHEMA.names]
    offsets = np.load(d / OFFSETS_FILE, mmap_mode="r")
    return Events(*arrays, user_offsets=offsets)


def sample_files(data_dir: str | Path, split: str) -> List[Path]:
    """The split's part files; none for a split the directory was prepared without."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return sorted((Path(data_dir) / SAMPLES_DIR / split).glob("part-*.parquet"))


def write_meta(out_dir: str | Path, meta: Dict[str, Any]) -> Dict[str, Any]:
    """Write meta.json with the size and SHA-256 of every file already in `out_dir` under
    "files": call it last. Returns the meta written."""
    meta = {**meta, "files": manifest(out_dir)}
    write_json(Path(out_dir) / META_FILE, meta)
    return meta


def read_meta(data_dir: str | Path, checksums: bool = False) -> Dict[str, Any]:
    """meta.json of a prepared directory whose files are all there at the sizes it lists (and,
    with `checksums`, the same bytes), else one line saying what is wrong. Sizes catch a
    directory prepare did not finish or another run changed; checksums also catch altered bytes
    at the price of reading every file once."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data directory (no {META_FILE}); run `mdaf prepare` first")
    meta = read_json(path, "prepared data")
    if not isinstance(meta, dict) or "files" not in meta:
        raise UserError(f"{path} lists no files to verify (written by an older `mdaf prepare`?); prepare the data again")
    verify_files(data_dir, meta["files"], "prepared data directory", checksums)
    return meta


def check_history_length(data_dir: str | Path, meta: Dict[str, Any], history_length: int) -> None:
    """Refuse to read `data_dir` (whose meta is `meta`) with another history length than it was
    prepared with: its category filter looked at that many clicks."""
    prepared = meta.get("history_length")
    if prepared is not None and prepared != history_length:
        raise UserError(
            f"model.history_length={history_length} but {data_dir} was prepared with history_length={prepared} "
            f"(its meta.json; the category filter looked at that many clicks): train with model.history_length={prepared}, "
            f"or prepare the data again with model.history_length={history_length}"
        )
