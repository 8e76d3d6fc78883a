"""The prepared-data directory: the one contract between `mdaf prepare` and the loader.

    DIR/meta.json              vocab sizes, row counts per stage, settings, versions
    DIR/events.arrow           click events sorted by (user, ts, original order); columns item,
                               category, ts (int32); one record batch, so it memory-maps as
                               contiguous arrays
    DIR/user_offsets.npy       int64 [num_users + 1]: user u's clicks are
                               events[user_offsets[u]:user_offsets[u + 1]] (user 0 = padding, empty)
    DIR/samples/{train,valid[,test]}/part-*.parquet
                               one row per CTR sample (SAMPLE_SCHEMA); its history is the
                               user's clicks before local position `pos`: events[off + max(0, pos - L): off + pos]

Ids are dense: 0 is reserved for padding/unknown in every table, so vocab sizes include it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

META_FILE = "meta.json"
EVENTS_FILE = "events.arrow"
OFFSETS_FILE = "user_offsets.npy"
SAMPLES_DIR = "samples"
# in time order: the split codes of `samples.assign_split` index it
SPLITS = ("train", "valid", "test")

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


def write_meta(out_dir: str | Path, meta: Dict[str, Any]) -> None:
    path = Path(out_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(data_dir: str | Path) -> Dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared data directory (no {META_FILE}); run `mdaf prepare` first")
    return json.loads(path.read_text())
