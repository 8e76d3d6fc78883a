"""`mdaf prepare` in bounded memory: the users split by a hash of their raw id into partitions,
each prepared on its own, then merged.

1. `scan`: one streaming pass over the input (`ingest.IngestStream`) keeps, besides the row
   counts of the ledger, only what every partition shares: the vocabularies (the distinct raw
   ids of the clicks; dense ids follow raw ids, `vocab`), the negatives' pool (every (window,
   category, item) clicked and how often, `samples.NegativePool`) and the clicks' time range.
   Each click row goes, raw, to the spill file of its user's bucket (`user_buckets`).
2. `prepare_partition`: the buckets of a partition go through every per-user stage on their own:
   dense ids from the shared vocabularies, click order, repeated clicks, histories, negatives from
   the shared pool with random numbers hashed from (user, position) (`samples.click_hashes`),
   filters, split; its samples are written as they come and its events kept for the merge.
3. `merge`: the partitions' events interleaved into the one `events.arrow` in user order, their
   sample files moved in, their counts summed.

So the output does not depend on the partitioning: events, offsets and vocabularies are the same
bytes, the samples the same rows (each partition writes its own part files, a positive followed
by its negatives, grouped by user). Memory: the scan holds two input blocks (the next one is
parsed while this one is spilled) and the shared tables (the pool is 16 bytes per distinct
(window, category, item)); a partition about
`BYTES_PER_CLICK` per click; the merge the events, 12 bytes per click. `prepare.memory_gb`
sets the number of partitions so that `prepare.workers` of them at a time fit
(`plan_partitions`); on a cluster, `mdaf prepare --partition I/N` runs the scan and partition I
as one task (each task reads the whole input) and `mdaf prepare --merge` joins the N results.
"""

from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdaf_dist.config import PrepareConfig
from mdaf_dist.data import samples as S
from mdaf_dist.data.ingest import BEHAVIORS, IngestReport, IngestStream, RawEvents, prefetched
from mdaf_dist.data.layout import REJECTS_FILE, SAMPLE_SCHEMA, SAMPLES_DIR, SPLITS, Events, write_events
from mdaf_dist.data.vocab import PADDING_RAW_ID, VOCAB_DIR, dense_of, load_vocab, save_vocab
from mdaf_dist.errors import UserError
from mdaf_dist.files import read_json, write_json
from mdaf_dist.heap import reused_heap

CLICK = BEHAVIORS.index("pv")
_INT32 = np.iinfo(np.int32)
# user buckets of a scan whose partition count the memory budget chooses afterwards
BUCKETS = 64
# peak bytes per click of `prepare_partition` (measured on synthetic data: tools/bench_data.py)
BYTES_PER_CLICK = 280
# a worker's memory besides its partition: the interpreter, numpy and pyarrow
WORKER_BASE_BYTES = 150 << 20
# the main process's while the workers run, besides the shared tables: the same and what the scan leaves
MAIN_BASE_BYTES = 300 << 20
# a partition smaller than this is not worth a worker process of its own
MIN_PARTITION_CLICKS = 1 << 20
# the scan packs raw (window, category, item) into one int64: ids below 2**25, windows within
# 2**11 of the window of `prepare.window_start`
_ID_BITS, _WINDOW_BITS = 25, 12
_WINDOW_OFFSET = 1 << (_WINDOW_BITS - 1)
_ID_MASK = (1 << _ID_BITS) - 1
# the spilled click rows: raw ids and timestamp, in file order per bucket (item and category
# below 2**25 and timestamps in the int32 range, as the scan checks first)
SPILL = np.dtype([("user", "<i8"), ("item", "<i4"), ("category", "<i4"), ("ts", "<i4")])
# a partition's events for the merge: dense user, item, category and ts in (user, ts) order
PART_EVENTS = np.dtype([("user", "<i4"), ("item", "<i4"), ("category", "<i4"), ("ts", "<i4")])
PART_EVENTS_FILE = "events.npy"
SUMMARY_FILE = "summary.json"
SCAN_FILE = "scan.json"
POOL_DIR = "pool"
# what `mdaf prepare --partition` writes into its directory
TASK_ENTRIES = (SCAN_FILE, POOL_DIR, VOCAB_DIR, PART_EVENTS_FILE, SAMPLES_DIR, REJECTS_FILE, SUMMARY_FILE, "spill")


def user_buckets(raw_user: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each raw user id: a hash, so buckets are about equal whatever the ids."""
    return (S.splitmix64(raw_user.astype(np.uint64)) % np.uint64(buckets)).astype(np.int64)


def parse_partition(text: str) -> Tuple[int, int]:
    """`--partition I/N` -> (I, N), 0 <= I < N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise UserError(f"--partition {text}: expected I/N with 0 <= I < N, e.g. 0/4 for the first of four partitions")
    return int(index), int(count)


class _DistinctKeys:
    """Sorted distinct keys over blocks (and how often each occurred, when `counted`), merged as
    they accumulate so that the pending blocks never hold more keys than the merged table."""

    def __init__(self, counted: bool) -> None:
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64) if counted else None
        self.pending: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []
        self.pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        self.pending.append(S.count_sorted(keys) if self.counts is not None else (np.sort(keys), None))
        self.pending_size += len(self.pending[-1][0])
        if self.pending_size > max(len(self.keys), 1 << 22):
            self.result()

    def result(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if self.pending:
            keys = np.concatenate([self.keys, *(k for k, _ in self.pending)])
            if self.counts is None:
                keys.sort()
                self.keys = keys[S.run_starts(keys)]
            else:
                self.keys, self.counts = S.count_sorted(keys, np.concatenate([self.counts, *(c for _, c in self.pending)]))
            self.pending, self.pending_size = [], 0
        return self.keys, self.counts


@dataclass
class Shared:
    """What every partition shares: the scan's counts, the vocabularies, the negatives' pool and
    the clicks' time range."""

    scan: Dict[str, Any]  # the ingest report and row counts, JSON
    vocab: Dict[str, np.ndarray]  # raw ids by dense id, [0] = padding
    pool: S.NegativePool

    @property
    def ts_range(self) -> Tuple[int, int]:
        return tuple(self.scan["ts_range"])

    def save(self, directory: Path) -> None:
        for name, raw_by_dense in self.vocab.items():
            save_vocab(directory, name, raw_by_dense)
        (directory / POOL_DIR).mkdir(parents=True, exist_ok=True)
        np.save(directory / POOL_DIR / "keys.npy", self.pool.keys)
        if self.pool.ends is not None:
            np.save(directory / POOL_DIR / "ends.npy", self.pool.ends)
        write_json(directory / SCAN_FILE, self.scan)

    @classmethod
    def load(cls, directory: Path) -> "Shared":
        """The saved tables, memory-mapped: the workers on one machine share their pages."""
        scan = read_json(directory / SCAN_FILE, "partition scan")
        vocab = {name: load_vocab(directory, name) for name in ("user", "item", "category")}
        ends = directory / POOL_DIR / "ends.npy"
        keys = np.load(directory / POOL_DIR / "keys.npy", mmap_mode="r")
        pool = _pool(keys, np.load(ends, mmap_mode="r") if ends.is_file() else None, scan, vocab)
        return cls(scan, vocab, pool)


def _pool(keys: np.ndarray, ends: Optional[np.ndarray], scan: Dict[str, Any], vocab: Dict[str, np.ndarray]) -> S.NegativePool:
    return S.NegativePool(keys, ends, scan["first_window"], scan["num_windows"], len(vocab["category"]), len(vocab["item"]))


@reused_heap()
def scan(cfg: PrepareConfig, rejects_path: Path, spill: Path, buckets: int, keep: Optional[int] = None, progress: bool = True) -> Shared:
    """Read the input once: the ledger's counts and the shared tables, and each click row spilled
    to `spill/bucket-B.bin` by `user_buckets` (only bucket `keep`, when given)."""
    stream = IngestStream(cfg.input, cfg, rejects_path, progress)
    users, pool = _DistinctKeys(counted=False), _DistinctKeys(counted=cfg.neg_sampling == "popularity")
    events = clicks = 0
    first_ts, last_ts = _INT32.max, _INT32.min
    spill.mkdir(parents=True, exist_ok=True)
    files: Dict[int, Any] = {}
    # the distinct keys sorted in a thread while this one spills the block (numpy releases the
    # GIL), one block at a time
    tables, added = ThreadPoolExecutor(1), []
    try:
        for block, _ in prefetched(stream):
            if cfg.user_fraction < 1.0:
                block = block.select(S.keep_users(block.user, cfg.user_fraction, cfg.seed))
            events += len(block)
            block = block.select(block.behavior == CLICK)
            clicks += len(block)
            if not len(block):
                continue
            first_ts, last_ts = min(first_ts, int(block.ts.min())), max(last_ts, int(block.ts.max()))
            if first_ts < _INT32.min or last_ts > _INT32.max:
                raise UserError("timestamps outside the int32 range; keep prepare.check_window=true")
            window = (block.ts - cfg.window_start) // cfg.neg_window_seconds + _WINDOW_OFFSET
            if window.min() < 0 or window.max() >> _WINDOW_BITS or max(block.item.max(), block.category.max()) > _ID_MASK:
                raise UserError(
                    f"{cfg.input}: prepare packs (window, category, item) into 64 bits: item and category ids must be below "
                    f"2**{_ID_BITS} and timestamps within {_WINDOW_OFFSET} windows of prepare.neg_window_seconds from "
                    "prepare.window_start (keep prepare.check_window=true)"
                )
            for done in added:
                done.result()
            added = [tables.submit(pool.add, (window << (2 * _ID_BITS)) | (block.category << _ID_BITS) | block.item),
                     tables.submit(users.add, block.user)]
            _spill(block, spill, files, buckets, keep)
        for done in added:
            done.result()
    finally:
        tables.shutdown()
        for f in files.values():
            f.close()
    pa.default_memory_pool().release_unused()  # the parsed blocks' memory, for the workers
    report = stream.report
    if clicks == 0:
        raise UserError(f"prepare: no click (pv) row among the {events} rows kept of {report.valid} valid ones "
                        f"(prepare.user_fraction={cfg.user_fraction:g}); nothing was written to {cfg.out}")
    return _shared(cfg, report, events, clicks, (first_ts, last_ts), users.result()[0], *pool.result())


def _spill(block: RawEvents, spill: Path, files: Dict[int, Any], buckets: int, keep: Optional[int]) -> None:
    """Append the block's click rows to their buckets' files, in file order."""
    bucket = user_buckets(block.user, buckets)
    rows = np.empty(len(block), SPILL)
    for name in SPILL.names:
        rows[name] = getattr(block, name)
    if keep is not None:
        _append(spill, files, keep, rows[bucket == keep])
        return
    order = np.argsort(bucket.astype(np.min_scalar_type(buckets)), kind="stable")  # a radix sort for small types
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    rows = rows[order]
    for b in range(buckets):
        _append(spill, files, b, rows[bounds[b] : bounds[b + 1]])


def _append(spill: Path, files: Dict[int, Any], bucket: int, rows: np.ndarray) -> None:
    if len(rows):
        if bucket not in files:
            files[bucket] = open(spill / f"bucket-{bucket:05d}.bin", "ab")
        rows.tofile(files[bucket])


def _shared(
    cfg: PrepareConfig, report: IngestReport, events: int, clicks: int, ts_range: Tuple[int, int],
    users: np.ndarray, pool_keys: np.ndarray, pool_clicks: Optional[np.ndarray],
) -> Shared:
    """The vocabularies and the dense pool from the scan's raw tables."""
    window = (pool_keys >> (2 * _ID_BITS)) - _WINDOW_OFFSET
    raw_category, raw_item = (pool_keys >> _ID_BITS) & _ID_MASK, pool_keys & _ID_MASK
    padding = np.array([PADDING_RAW_ID], dtype=np.int64)
    vocab = {"user": np.concatenate([padding, users])}
    vocab["item"] = np.concatenate([padding, S.count_sorted(raw_item)[0]])
    vocab["category"] = np.concatenate([padding, S.count_sorted(raw_category)[0]])
    first_window = int(window[0])
    scan_counts = {
        "ingest": {"lines": report.lines, "valid": report.valid, "rejected": report.rejected, "rejects_path": report.rejects_path, "header": report.header},
        "events": events,
        "clicks": clicks,
        "ts_range": [int(t) for t in ts_range],
        "first_window": first_window,
        "num_windows": int(window[-1]) - first_window + 1,
    }
    # dense ids keep the raw order, so the dense keys stay sorted
    keys = S.pack_pool_keys(window - first_window, dense_of(vocab["category"], raw_category), dense_of(vocab["item"], raw_item),
                            len(vocab["category"]), len(vocab["item"]))
    pool = S.NegativePool.of(keys, pool_clicks, cfg.neg_sampling, first_window, scan_counts["num_windows"], len(vocab["category"]), len(vocab["item"]))
    return Shared(scan_counts, vocab, pool)


def plan_partitions(cfg: PrepareConfig, shared: Shared) -> int:
    """Partitions for the memory budget: `prepare.partitions`, or as few as let `workers` of them
    run at a time within `prepare.memory_gb` beside the shared tables, but one per worker when
    there are clicks enough."""
    if cfg.partitions:
        return cfg.partitions
    workers = worker_count(cfg)
    # the shared tables are memory-mapped by the workers: their pages held once
    shared_bytes = shared.pool.keys.nbytes * (1 + (shared.pool.ends is not None)) + sum(v.nbytes for v in shared.vocab.values())
    per_worker = (cfg.memory_gb * 2**30 - shared_bytes - MAIN_BASE_BYTES) / workers - WORKER_BASE_BYTES
    need = shared.scan["clicks"] * BYTES_PER_CLICK
    if per_worker < need / BUCKETS:
        raise UserError(
            f"prepare.memory_gb={cfg.memory_gb:g} is too small for {shared.scan['clicks']:,} clicks on {workers} workers "
            f"(they need at least {(workers * (need / BUCKETS + WORKER_BASE_BYTES) + shared_bytes + MAIN_BASE_BYTES) / 2**30:.2f} GB): "
            "raise it or lower prepare.workers"
        )
    # and at least one per worker where each gets enough clicks to be worth a process
    return max(1, min(BUCKETS, max(math.ceil(need / per_worker), min(workers, shared.scan["clicks"] // MIN_PARTITION_CLICKS))))


def worker_count(cfg: PrepareConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


class _PartWriter:
    """Appends samples to samples/<split>/part-*.parquet as they come: row groups of exactly
    `samples_row_group` rows (the split's last may be shorter), `samples_part_row_groups` per file.

    Part files let the loader spread row groups over ranks and workers.
    """

    def __init__(self, out: Path, split: str, cfg: PrepareConfig) -> None:
        self.directory = out / SAMPLES_DIR / split
        self.directory.mkdir(parents=True, exist_ok=True)
        self.group_rows, self.groups_per_file = cfg.samples_row_group, cfg.samples_part_row_groups
        self.pending: List[pa.Table] = []
        self.pending_rows = 0
        self.writer: Optional[pq.ParquetWriter] = None
        self.files = self.row_groups = self.rows = self.positives = 0

    def write(self, samples: S.Samples) -> None:
        self.pending.append(pa.table([getattr(samples, name) for name in SAMPLE_SCHEMA.names], schema=SAMPLE_SCHEMA))
        self.pending_rows += len(samples)
        self.rows += len(samples)
        self.positives += int(samples.label.sum(dtype=np.int64))
        while self.pending_rows >= self.group_rows:
            self._write_group(self.group_rows)

    def _write_group(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        if self.writer is None:
            # dictionary pages cost 3x the write time for about 10 % smaller files: ids are too many
            self.writer = pq.ParquetWriter(self.directory / f"part-{self.files:05d}.parquet", SAMPLE_SCHEMA, use_dictionary=False)
            self.files += 1
        self.writer.write_table(table.slice(0, rows), row_group_size=rows)
        self.row_groups += 1
        if self.row_groups % self.groups_per_file == 0:
            self.writer.close()
            self.writer = None
        self.pending, self.pending_rows = [table.slice(rows)], len(table) - rows

    def close(self) -> Dict[str, Any]:
        if self.pending_rows:
            self._write_group(self.pending_rows)
        if self.writer is not None:
            self.writer.close()
        return {"rows": self.rows, "positives": self.positives, "files": self.files, "row_groups": self.row_groups}


def _filter_and_write(
    out: Path, clicks: S.Clicks, draw: S.NegativeDraw, cfg: PrepareConfig, history_length: int, bounds: Tuple[int, Optional[int]]
) -> Tuple[Dict[str, Dict[str, Any]], np.ndarray]:
    """Build, filter, split and write the samples chunk by chunk of clicks, so that at most
    about `samples.CHUNK` sample rows exist at a time.

    Returns the splits' summaries and the `samples.split_counts` after: positives, + negatives,
    - empty history, - category filter (int64 [4, 6]).
    """
    valid_start, test_start = bounds
    writers = {split: _PartWriter(out, split, cfg) for split in SPLITS[: 2 if test_start is None else 3]}
    # without a test split the test code never occurs
    test_start = np.iinfo(np.int64).max if test_start is None else test_start
    history = S.CategoryHistory(clicks)
    tallies = np.zeros((4, 2 * len(SPLITS)), dtype=np.int64)
    n_clicks = len(clicks.user)
    step = max(1, S.CHUNK * n_clicks // max(n_clicks + len(draw.owner), 1))
    for start in range(0, n_clicks, step):
        chunk = S.with_negatives(clicks, draw, start, min(start + step, n_clicks))
        split = S.assign_split(chunk.ts, valid_start, test_start)
        positive = chunk.label == 1
        tallies[0] += S.split_counts(chunk.label[positive], split[positive])
        tallies[1] += S.split_counts(chunk.label, split)
        with_history = S.has_history(chunk)
        keep = with_history.copy() if cfg.drop_empty_history else np.ones(len(chunk), dtype=bool)
        tallies[2] += S.split_counts(chunk.label[keep], split[keep])
        # the filter looks at the samples still kept but for negatives with a history drawn from
        # the categories it looks at (`samples.draw_negatives`): those pass by construction
        lookup = keep & (positive | ~with_history) if cfg.neg_category == "filter" else keep
        rows = np.flatnonzero(lookup)
        keep[rows] = S.category_filter(history, chunk.select(rows), cfg.category_filter, history_length, cfg.category_last_k)
        tallies[3] += S.split_counts(chunk.label[keep], split[keep])
        for code, writer in enumerate(writers.values()):
            writer.write(chunk.select(keep & (split == code)))
    return {split: writer.close() for split, writer in writers.items()}, tallies


@reused_heap()
def prepare_partition(cfg: PrepareConfig, history_length: int, shared: Shared, spills: Iterable[Path], bounds: Tuple[int, Optional[int]], out: Path) -> Dict[str, Any]:
    """Every per-user stage for the click rows spilled to `spills`; samples and events written
    into `out`; returns its counts (also in out/summary.json)."""
    rows = np.concatenate([np.fromfile(path, SPILL) for path in spills]) if spills else np.zeros(0, SPILL)
    columns = {name: dense_of(shared.vocab[name], rows[name]) for name in ("user", "item", "category")}
    columns["ts"] = rows["ts"].astype(np.int32)
    del rows
    # dense user ids follow raw ids, so this is the (raw user, ts, file order) order
    order = S.click_order(columns["user"], columns["ts"])
    for name in columns:
        columns[name] = columns[name][order]
    del order
    repeated = S.repeated_clicks(columns["user"], columns["item"], cfg.dedup_clicks)
    n_repeated = int(repeated.sum())
    if n_repeated:
        for name in columns:
            columns[name] = columns[name][~repeated]
    del repeated
    clicks = S.make_clicks(columns["user"], columns["item"], columns["category"], columns["ts"], len(shared.vocab["user"]))
    del columns
    out.mkdir(parents=True, exist_ok=True)
    events = np.empty(len(clicks.user), PART_EVENTS)
    for name in PART_EVENTS.names:
        events[name] = getattr(clicks, name)
    np.save(out / PART_EVENTS_FILE, events)
    del events
    clicks.history_end = S.history_ends(
        clicks, cfg.history_cutoff, window_start=cfg.window_start, window_seconds=cfg.neg_window_seconds, session_gap_seconds=cfg.session_gap_seconds
    )
    click_hash = S.click_hashes(clicks, cfg.seed)
    span = S.filter_span(cfg.category_filter, history_length, cfg.category_last_k)
    draw = S.draw_negatives(
        clicks,
        S.negative_counts(click_hash, cfg.neg_ratio),
        shared.pool,
        click_hash,
        window_start=cfg.window_start,
        window_seconds=cfg.neg_window_seconds,
        max_draws=cfg.neg_max_draws,
        category_span=span if cfg.neg_category == "filter" else None,
    )
    del click_hash
    splits, tallies = _filter_and_write(out, clicks, draw, cfg, history_length, bounds)
    summary = {"clicks": len(clicks.user), "repeated": n_repeated, "requested": draw.requested, "unavailable": draw.unavailable,
               "tallies": tallies.tolist(), "splits": splits}
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _prepare_partition_task(cfg: PrepareConfig, history_length: int, shared_dir: str, spills: List[str], bounds: Tuple[int, Optional[int]], out: str) -> Dict[str, Any]:
    """`prepare_partition` in a worker process: the shared tables read from `shared_dir`."""
    return prepare_partition(cfg, history_length, Shared.load(Path(shared_dir)), [Path(p) for p in spills], bounds, Path(out))


def prepare_partitions(cfg: PrepareConfig, history_length: int, shared: Shared, shared_dir: Path, spill: Path, buckets: int, partitions: int,
                       bounds: Tuple[int, Optional[int]], work: Path) -> List[Path]:
    """Partition j (the buckets b with b % partitions == j) into work/part-j, `prepare.workers`
    at a time in worker processes (in this one when one at a time); returns the directories."""
    outs = [work / f"part-{j:05d}" for j in range(partitions)]
    spills = [[p for b in range(j, buckets, partitions) if (p := spill / f"bucket-{b:05d}.bin").is_file()] for j in range(partitions)]
    workers = min(worker_count(cfg), partitions)
    if workers == 1:
        for paths, out in zip(spills, outs):
            prepare_partition(cfg, history_length, shared, paths, bounds, out)
        return outs
    shared.save(shared_dir)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_prepare_partition_task, cfg, history_length, str(shared_dir), [str(p) for p in paths], bounds, str(out))
                for paths, out in zip(spills, outs)]
        for job in jobs:
            job.result()
    return outs


@dataclass
class Totals:
    """The partitions' counts, summed."""

    clicks: int
    repeated: int
    requested: int
    unavailable: int
    tallies: np.ndarray  # int64 [4, 6], as `_filter_and_write` returns
    splits: Dict[str, Dict[str, Any]]


def merge(shared: Shared, parts: List[Path], out: Path) -> Totals:
    """Write the events, offsets and vocabularies of all partitions into `out` and move their
    sample files there (samples/<split>/part-<partition>-<file>.parquet); returns their counts."""
    summaries = [read_json(part / SUMMARY_FILE, "partition summary") for part in parts]
    num_users = len(shared.vocab["user"])
    per_user = np.zeros(num_users, dtype=np.int64)
    for part in parts:
        per_user += np.bincount(_part_events(part)["user"], minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(per_user, out=offsets[1:])
    scratch = out / ".merge"
    scratch.mkdir()
    columns = {name: np.lib.format.open_memmap(scratch / f"{name}.npy", "w+", np.int32, (int(offsets[-1]),)) for name in ("item", "category", "ts")}
    for part in parts:
        # a partition holds whole users in user order: each one's clicks go to its global offset;
        # one partition mapped at a time
        events = _part_events(part)
        user = np.array(events["user"])
        clicks = np.bincount(user, minlength=num_users)
        destination = offsets[user] + np.arange(len(user)) - (np.cumsum(clicks) - clicks)[user]
        for name, column in columns.items():
            column[destination] = events[name]
        del events
    write_events(out, Events(columns["item"], columns["category"], columns["ts"], offsets))
    del columns
    shutil.rmtree(scratch)
    for name, raw_by_dense in shared.vocab.items():
        save_vocab(out, name, raw_by_dense)
    for index, part in enumerate(parts):
        for file in sorted(part.glob(f"{SAMPLES_DIR}/*/part-*.parquet")):
            target = out / SAMPLES_DIR / file.parent.name / f"part-{index:05d}-{file.name[len('part-'):]}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    splits = {split: {key: sum(s["splits"][split][key] for s in summaries) for key in ("rows", "positives", "files", "row_groups")}
              for split in SPLITS if split in summaries[0]["splits"]}
    for info in splits.values():
        info["positive_share"] = info["positives"] / max(info["rows"], 1)
    return Totals(
        clicks=sum(s["clicks"] for s in summaries),
        repeated=sum(s["repeated"] for s in summaries),
        requested=sum(s["requested"] for s in summaries),
        unavailable=sum(s["unavailable"] for s in summaries),
        tallies=sum(np.array(s["tallies"], dtype=np.int64) for s in summaries),
        splits=splits,
    )


def _part_events(part: Path) -> np.ndarray:
    return np.load(part / PART_EVENTS_FILE, mmap_mode="r")


def task_directory(final: Path, index: int, count: int) -> Path:
    """Where `mdaf prepare --partition I/N` publishes partition I: DIR.partitions/part-I-of-N."""
    return final.with_name(f"{final.name}.partitions") / f"part-{index:05d}-of-{count:05d}"


def task_directories(final: Path) -> List[Path]:
    """The N partitions `mdaf prepare --merge` joins, all of them there, else one line naming the first missing."""
    root = final.with_name(f"{final.name}.partitions")
    found = sorted(root.glob("part-*-of-*")) if root.is_dir() else []
    if not found:
        raise UserError(f"prepare --merge: no partition in {root}; run `mdaf prepare --partition I/N` for I = 0..N-1 first")
    count = int(found[0].name.rsplit("-", 1)[1])
    for index in range(count):
        path = task_directory(final, index, count)
        if not (path / SUMMARY_FILE).is_file():
            raise UserError(f"prepare --merge: partition {index}/{count} is missing ({path}); run `mdaf prepare --partition {index}/{count}` first")
    extra = sorted(set(found) - {task_directory(final, i, count) for i in range(count)})
    if extra:
        raise UserError(f"prepare --merge: {extra[0]} belongs to another partitioning than {count} partitions; remove it")
    return [task_directory(final, index, count) for index in range(count)]

