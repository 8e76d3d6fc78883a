"""`mdaf prepare`: raw UserBehavior CSV -> per-user click histories + CTR samples (DESIGN 3).

Stages, each counted in meta["stages"] so that every row is accounted for
(rows = previous rows - dropped + added):

1. ingest: every line validated; bad lines go to DIR/rejects.csv with their reason.
2. user subsampling (`user_fraction`, `seed`): a hash of (raw user id, seed) decides, so the
   same users are kept whatever else is in the file, and the paper-scale subset and the full
   data come from the same command. Paper scale: 5.1.1 starts from 1,052,081 training samples.
   The full file has about 89.7M clicks (pv) among 100.15M rows, about 8/9 of them before the
   last day; at neg_ratio 1.5 that is about 2.0 training samples per raw row (1.99 measured
   on 2M synthetic rows), so `user_fraction=0.0053` gives about 1.05M training samples before
   the filters, and 0.0105 (1.05M raw rows) about 2.1M. Measured values are in meta["stages"].
3. clicks: pv events, sorted by (user, ts, original file order); cart/fav/buy are dropped.
   Dense ids (`mdaf_dist.data.vocab`) are built over the kept clicks, so every embedding row
   is used; DIR/vocab/{user,item,category}.npy map dense ids back to raw ids.
4. positives: every click; its history is the user's clicks before it (`pos`).
5. negatives: `neg_ratio` per positive from the same time window (`samples.draw_negatives`).
6. empty-history removal, 7. category filter (`samples.category_filter`), 8. temporal split.

Output: `mdaf_dist.data.layout` (events.arrow, user_offsets.npy, samples/{train,valid}/part-*.parquet
in production order, meta.json). The loader shuffles; samples are written grouped by user and
time, a positive followed by its negatives.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import mdaf_dist
from mdaf_dist.config import PrepareConfig, load_config, to_dict
from mdaf_dist.data import samples as S
from mdaf_dist.data.ingest import BEHAVIORS, RawEvents, ingest
from mdaf_dist.data.layout import SAMPLE_SCHEMA, SAMPLES_DIR, SPLITS, Events, write_events, write_meta
from mdaf_dist.data.vocab import dense_ids, save_vocab
from mdaf_dist.errors import UserError

REJECTS_FILE = "rejects.csv"
CLICK = BEHAVIORS.index("pv")
_INT32 = np.iinfo(np.int32)


class _Stages:
    """The row-count ledger of meta["stages"], and the stage timings of meta["seconds"]."""

    def __init__(self, progress: bool) -> None:
        self.rows: List[Dict[str, Any]] = []
        self.seconds: Dict[str, float] = {}
        self.progress = progress

    def add(self, stage: str, rows: int, *, dropped: int = 0, added: int = 0, split: Optional[Dict[str, int]] = None) -> None:
        previous = self.rows[-1]["rows"] if self.rows else rows + dropped - added
        if rows != previous - dropped + added:
            raise AssertionError(f"stage {stage!r}: {rows} rows != {previous} - {dropped} + {added}")
        self.rows.append({"stage": stage, "rows": int(rows), "dropped": int(dropped), "added": int(added), **(split or {})})

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        if self.progress:
            print(f"prepare: {name} done in {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


def _split_counts(samples: S.Samples, keep: np.ndarray, valid: np.ndarray) -> Dict[str, int]:
    """Train/valid rows and positives of the samples still kept."""
    n_train, n_valid, pos_train, pos_valid = S.split_counts(samples.label[keep], valid[keep])
    return {"train": n_train, "valid": n_valid, "train_positives": pos_train, "valid_positives": pos_valid}


def _check_settings(cfg: PrepareConfig) -> None:
    if not cfg.input:
        raise UserError("no input: pass --input PATH (or prepare.input=PATH)")
    if not cfg.out:
        raise UserError("no output directory: pass --out DIR (or prepare.out=DIR)")
    if cfg.history_length < 1 or cfg.category_last_k < 1:
        raise UserError("prepare.history_length and prepare.category_last_k must be >= 1")
    if cfg.samples_row_group < 1 or cfg.samples_part_row_groups < 1 or cfg.neg_max_draws < 1:
        raise UserError("prepare.samples_row_group, samples_part_row_groups and neg_max_draws must be >= 1")
    if cfg.category_filter not in S.CATEGORY_FILTERS:
        raise UserError(f"prepare.category_filter must be one of {S.CATEGORY_FILTERS}, got {cfg.category_filter!r}")
    if cfg.neg_sampling not in S.NEG_SAMPLING:
        raise UserError(f"prepare.neg_sampling must be one of {S.NEG_SAMPLING}, got {cfg.neg_sampling!r}")
    S.valid_start(cfg.window_start, cfg.window_days, cfg.valid_days)
    if not 0.0 < cfg.user_fraction <= 1.0:
        raise UserError(f"prepare.user_fraction must be in (0, 1], got {cfg.user_fraction}")
    if cfg.neg_ratio < 0:
        raise UserError(f"prepare.neg_ratio must be >= 0, got {cfg.neg_ratio}")


def source_fingerprint(source: str) -> Dict[str, Any]:
    """Name, size and a hash of both: cheap to compute for 3.7 GB, enough to tell inputs apart."""
    fs, path = fsspec.core.url_to_fs(source)
    name, size = Path(path).name, int(fs.size(path))
    digest = hashlib.sha256(f"{name}\0{size}".encode()).hexdigest()[:16]
    return {"name": name, "bytes": size, "sha256_name_size": digest}


def _clicks(raw: RawEvents, out: Path) -> tuple[S.Clicks, Dict[str, int]]:
    """Clicks in (user, ts, file order), dense ids, vocab maps saved; returns vocab sizes."""
    is_click = raw.behavior == CLICK
    user, ts = raw.user[is_click], raw.ts[is_click]
    order = S.click_order(user, ts)
    user, ts = user[order], ts[order]
    if len(ts) and (ts.min() < _INT32.min or ts.max() > _INT32.max):
        raise UserError("timestamps outside the int32 range; keep prepare.check_window=true")
    columns = {"user": user, "item": raw.item[is_click][order], "category": raw.category[is_click][order]}
    del user, order
    dense = {}
    vocab = {}
    for name, values in columns.items():
        dense[name], raw_by_dense = dense_ids(values)
        save_vocab(out, name, raw_by_dense)
        vocab[name] = len(raw_by_dense)
    clicks = S.make_clicks(dense["user"], dense["item"], dense["category"], ts.astype(np.int32), vocab["user"])
    return clicks, vocab


def write_samples(out: Path, split: str, samples: S.Samples, rows: np.ndarray, cfg: PrepareConfig) -> Dict[str, int]:
    """samples[rows] as part files of `samples_part_row_groups` row groups of `samples_row_group` rows.

    Part files let the loader spread row groups over ranks and workers; old part files of the
    split are removed first, so a re-run never mixes outputs.
    """
    directory = out / SAMPLES_DIR / split
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("part-*.parquet"):
        old.unlink()
    part_rows = cfg.samples_row_group * cfg.samples_part_row_groups
    files = 0
    for files, start in enumerate(range(0, len(rows), part_rows), start=1):
        take = rows[start : start + part_rows]
        table = pa.table([getattr(samples, name)[take] for name in SAMPLE_SCHEMA.names], schema=SAMPLE_SCHEMA)
        pq.write_table(table, directory / f"part-{files - 1:05d}.parquet", row_group_size=cfg.samples_row_group)
    return {"files": files, "row_groups": -(-len(rows) // cfg.samples_row_group)}


def prepare(cfg: PrepareConfig, progress: bool = True) -> Dict[str, Any]:
    """Run every stage; write the prepared directory `cfg.out`; print the stage table; return meta."""
    _check_settings(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(cfg.input)
    stages = _Stages(progress)

    with stages.timed("ingest"):
        raw, report = ingest(cfg.input, cfg, out / REJECTS_FILE, progress=progress)
    stages.add("raw lines", report.lines)
    stages.add("ingest: valid rows", report.valid, dropped=report.lines - report.valid)

    with stages.timed("subsample"):
        if cfg.user_fraction < 1.0:
            keep = S.keep_users(raw.user, cfg.user_fraction, cfg.seed)
            raw = RawEvents(raw.user[keep], raw.item[keep], raw.category[keep], raw.behavior[keep], raw.ts[keep])
    stages.add(f"users subsampled ({cfg.user_fraction:g})", len(raw), dropped=report.valid - len(raw))

    with stages.timed("clicks"):
        n_events = len(raw)
        clicks, vocab = _clicks(raw, out)
        del raw
        write_events(out, Events(clicks.item, clicks.category, clicks.ts, clicks.user_offsets))
    n_clicks = len(clicks.user)
    stages.add("clicks (pv)", n_clicks, dropped=n_events - n_clicks)

    with stages.timed("negatives"):
        counts = S.negative_counts(n_clicks, cfg.neg_ratio, cfg.seed)
        draw = S.draw_negatives(
            clicks,
            counts,
            window_start=cfg.window_start,
            window_seconds=cfg.neg_window_seconds,
            sampling=cfg.neg_sampling,
            max_draws=cfg.neg_max_draws,
            seed=cfg.seed,
        )
        del counts
        samples = S.with_negatives(clicks, draw)
    start_of_valid = S.valid_start(cfg.window_start, cfg.window_days, cfg.valid_days)
    valid = S.is_valid(samples.ts, start_of_valid)
    stages.add("positives", n_clicks, split=_split_counts(samples, samples.label == 1, valid))
    keep = np.ones(len(samples), dtype=bool)
    stages.add(
        f"+ negatives (ratio {cfg.neg_ratio:g}, {cfg.neg_sampling})",
        len(samples),
        added=draw.requested,
        dropped=draw.unavailable,
        split=_split_counts(samples, keep, valid),
    )
    negatives = {"requested": draw.requested, "unavailable": draw.unavailable}
    del draw

    with stages.timed("filters"):
        if cfg.drop_empty_history:
            keep = S.has_history(samples)
        stages.add(
            "- empty history" if cfg.drop_empty_history else "- empty history (off)",
            int(keep.sum()),
            dropped=len(samples) - int(keep.sum()),
            split=_split_counts(samples, keep, valid),
        )
        before = int(keep.sum())
        keep &= S.category_filter(clicks, samples, cfg.category_filter, cfg.history_length, cfg.category_last_k)
        stages.add(
            f"- category filter ({cfg.category_filter})",
            int(keep.sum()),
            dropped=before - int(keep.sum()),
            split=_split_counts(samples, keep, valid),
        )

    splits: Dict[str, Dict[str, Any]] = {}
    with stages.timed("write"):
        for split, in_split in zip(SPLITS, (~valid, valid)):
            rows = np.flatnonzero(keep & in_split)
            files = write_samples(out, split, samples, rows, cfg)
            positives = int(samples.label[rows].sum(dtype=np.int64))
            splits[split] = {"rows": len(rows), "positives": positives, "positive_share": positives / max(len(rows), 1), **files}

    meta = {
        "vocab": vocab,
        "num_users": len(clicks.user_offsets) - 1,
        "num_clicks": n_clicks,
        "history_length": cfg.history_length,
        "valid_start_ts": start_of_valid,
        "stages": stages.rows,
        "splits": splits,
        "negatives": negatives,
        "ingest": {"lines": report.lines, "valid": report.valid, "rejected": report.rejected, "rejects_path": report.rejects_path},
        "source": fingerprint,
        "settings": to_dict(cfg),
        "versions": {"mdaf_dist": mdaf_dist.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "python": sys.version.split()[0]},
        "seconds": stages.seconds,
    }
    write_meta(out, meta)
    print(stage_table(meta))
    if report.rejected:
        reasons = ", ".join(f"{reason}={count}" for reason, count in report.rejected.items())
        print(f"rejected: {reasons} (lines in {report.rejects_path})")
    return meta


def stage_table(meta: Dict[str, Any]) -> str:
    """The stage ledger as a text table, in the spirit of MDAF_paper.md Table 6."""
    header = ("stage", "rows", "dropped", "added", "train", "valid", "pos %")
    lines = []
    for row in meta["stages"]:
        has_split = "train" in row
        share = (row["train_positives"] + row["valid_positives"]) / max(row["rows"], 1) if has_split else None
        lines.append(
            (
                row["stage"],
                f"{row['rows']:,}",
                f"{row['dropped']:,}" if row["dropped"] else "",
                f"{row['added']:,}" if row["added"] else "",
                f"{row['train']:,}" if has_split else "",
                f"{row['valid']:,}" if has_split else "",
                f"{100 * share:.1f}" if share is not None else "",
            )
        )
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(cells) for cells in lines)])


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="raw UserBehavior CSV (.csv, .csv.gz, .zip; local path or URI)")
    parser.add_argument("--out", help="output directory (prepared-data layout)")
    parser.add_argument("--config", help="YAML config file; its prepare: section is used")
    parser.add_argument("--quiet", action="store_true", help="no progress output (the stage table is still printed)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prepare.neg_ratio=2 prepare.user_fraction=0.01")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides).prepare
    cfg.input = args.input or cfg.input
    cfg.out = args.out or cfg.out
    prepare(cfg, progress=not args.quiet)
    return 0
