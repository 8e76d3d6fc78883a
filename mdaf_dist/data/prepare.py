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
   is used; DIR/vocab/{user,item,category}.npy map dense ids back to raw ids. Repeated clicks
   are dropped or kept by `dedup_clicks` (`samples.repeated_clicks`, its own ledger row).
4. positives: every click; its history is the user's clicks before it (`pos`), or before its
   day or session (`history_cutoff`, `samples.history_ends`).
5. negatives: `neg_ratio` per positive from the same time window (`samples.draw_negatives`).
   `neg_category="any"` (configs/paper.yaml: the paper's protocol) draws them from any category,
   once, before the filters and whatever they are set to: data that differ only by a filter
   share their negatives, and the category filter drops most of them. `neg_category="filter"`
   (the code's default) draws a category from the history span the category filter looks at,
   so that negatives survive the filter as positives do and the kept samples stay about 40 %
   positive (33 % measured on synthetic data, as on real histories, where the filter drops about a
   third of positives; "any" gives 88-91 %), at the price of negatives
   that change with the filter setting. A positive without history gets negatives from the
   whole window either way. meta["negatives"]["category"] records the choice.
6. empty-history removal, 7. category filter (`samples.category_filter`), 8. temporal split
   (`split_bounds`: train / valid [/ test] by days of the window or by fractions of the clicks'
   time range; a split is cut in time, so no two splits overlap in time).
   Stages 6-8 and the writing run chunk by chunk of clicks: all samples (2.5 per click) are
   never in memory at once. Each filter's drop of training samples is printed beside the
   paper's (`paper_counts`), and kept in meta["versus_paper"] with the validation share.

Output: `mdaf_dist.data.layout` (events.arrow, user_offsets.npy, samples/{train,valid[,test]}/part-*.parquet
in production order, meta.json). The loader shuffles; samples are written grouped by user and
time, a positive followed by its negatives. Everything is written into a temporary sibling of the
output directory and moved into place when complete, meta.json (with every file's size and
SHA-256) last: a prepare that fails or is killed leaves the previous data intact or refused by
readers, never a mix; a stale split or rejects file of an earlier run is replaced, the user's own
files in the directory are left alone. A split it must make that ends up empty fails the run,
naming the stage that emptied it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import resource
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
from mdaf_dist.config import ModelConfig, PrepareConfig, load_config, to_dict
from mdaf_dist.data import paper_counts
from mdaf_dist.data import samples as S
from mdaf_dist.data.ingest import BEHAVIORS, RawEvents, ingest
from mdaf_dist.data.layout import META_FILE, PREPARED_ENTRIES, REJECTS_FILE, SAMPLE_SCHEMA, SAMPLES_DIR, SPLITS, Events, write_events, write_meta
from mdaf_dist.data.vocab import dense_ids, save_vocab
from mdaf_dist.errors import UserError
from mdaf_dist.files import output_directory, published_directory

CLICK = BEHAVIORS.index("pv")
_INT32 = np.iinfo(np.int32)


class _Stages:
    """The row-count ledger of meta["stages"]; per step, wall and CPU seconds (meta["seconds"],
    meta["cpu_seconds"]: on a busy machine the CPU time is the steadier number) and the process's
    peak resident memory so far (meta["peak_rss_gb"]: where it jumps is the step to slim)."""

    def __init__(self, progress: bool) -> None:
        self.rows: List[Dict[str, Any]] = []
        self.seconds: Dict[str, float] = {}
        self.cpu_seconds: Dict[str, float] = {}
        self.peak_rss_gb: Dict[str, float] = {}
        self.progress = progress

    def add(self, stage: str, rows: int, *, dropped: int = 0, added: int = 0, split: Optional[Dict[str, int]] = None, key: str = "") -> None:
        """`key`: the stage's name in meta["versus_paper"], for the rows the paper counts."""
        previous = self.rows[-1]["rows"] if self.rows else rows + dropped - added
        if rows != previous - dropped + added:
            raise AssertionError(f"stage {stage!r}: {rows} rows != {previous} - {dropped} + {added}")
        self.rows.append({"stage": stage, "rows": int(rows), "dropped": int(dropped), "added": int(added), **(split or {}), **({"key": key} if key else {})})

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.cpu_seconds[name] = round(time.process_time() - cpu_start, 3)
        self.peak_rss_gb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        if self.progress:
            print(f"prepare: {name} done in {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


class _Tally:
    """Rows and positives per split of one ledger stage, summed over the chunks of samples."""

    KEYS = SPLITS + tuple(f"{name}_positives" for name in SPLITS)

    def __init__(self) -> None:
        self.counts = np.zeros(len(self.KEYS), dtype=np.int64)

    def add(self, labels: np.ndarray, split: np.ndarray) -> None:
        self.counts += S.split_counts(labels, split)

    @property
    def rows(self) -> int:
        return int(self.counts[: len(SPLITS)].sum())

    def split(self) -> Dict[str, int]:
        return dict(zip(self.KEYS, map(int, self.counts)))


def _check_settings(cfg: PrepareConfig, history_length: int) -> None:
    if not cfg.input:
        raise UserError("no input: pass --input PATH (or prepare.input=PATH)")
    if not cfg.out:
        raise UserError("no output directory: pass --out DIR (or prepare.out=DIR)")
    if history_length < 1 or cfg.category_last_k < 1:
        raise UserError("model.history_length and prepare.category_last_k must be >= 1")
    if cfg.samples_row_group < 1 or cfg.samples_part_row_groups < 1 or cfg.neg_max_draws < 1:
        raise UserError("prepare.samples_row_group, samples_part_row_groups and neg_max_draws must be >= 1")
    if cfg.split == "days":
        S.split_bounds_by_days(cfg.window_start, cfg.window_days, cfg.valid_days, cfg.test_days)
    else:
        S.split_bounds_by_fraction(0, 1, cfg.valid_fraction, cfg.test_fraction)
    if not 0.0 < cfg.user_fraction <= 1.0:
        raise UserError(f"prepare.user_fraction must be in (0, 1], got {cfg.user_fraction}")
    if cfg.neg_ratio < 0:
        raise UserError(f"prepare.neg_ratio must be >= 0, got {cfg.neg_ratio}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:  # nan fails too
        raise UserError(f"prepare.max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    if cfg.block_size_bytes < 1:
        raise UserError(f"prepare.block_size_bytes must be >= 1, got {cfg.block_size_bytes}")


def split_bounds(cfg: PrepareConfig, clicks: S.Clicks) -> tuple[int, Optional[int]]:
    """(first validation ts, first test ts or None without a test split), by `prepare.split`."""
    if cfg.split == "days":
        valid_start, test_start = S.split_bounds_by_days(cfg.window_start, cfg.window_days, cfg.valid_days, cfg.test_days)
        has_test = cfg.test_days > 0
    else:
        first, last = (int(clicks.ts.min()), int(clicks.ts.max())) if len(clicks.ts) else (0, 0)
        valid_start, test_start = S.split_bounds_by_fraction(first, last, cfg.valid_fraction, cfg.test_fraction)
        has_test = cfg.test_fraction > 0
    return valid_start, test_start if has_test else None


def source_fingerprint(source: str) -> Dict[str, Any]:
    """Name, size and a hash of both: cheap to compute for 3.7 GB, enough to tell inputs apart."""
    fs, path = fsspec.core.url_to_fs(source)
    name, size = Path(path).name, int(fs.size(path))
    digest = hashlib.sha256(f"{name}\0{size}".encode()).hexdigest()[:16]
    return {"name": name, "bytes": size, "sha256_name_size": digest}


def _clicks(raw: RawEvents, out: Path, dedup: str) -> tuple[S.Clicks, Dict[str, int], int]:
    """Clicks in (user, ts, file order), dense ids, vocab maps saved, repeats dropped by `dedup`
    (`samples.repeated_clicks`); returns vocab sizes and the number of repeats dropped.

    Consumes `raw`: each int64 column is released once its int32 click column exists, so the
    raw rows and the clicks are never all in memory together.
    """
    is_click = raw.behavior == CLICK
    raw.behavior = None
    ts = raw.ts[is_click]
    raw.ts = None
    if len(ts) and (ts.min() < _INT32.min or ts.max() > _INT32.max):
        raise UserError("timestamps outside the int32 range; keep prepare.check_window=true")
    columns = {"ts": ts.astype(np.int32)}
    del ts
    vocab = {}
    for name in ("user", "item", "category"):
        columns[name], raw_by_dense = dense_ids(getattr(raw, name)[is_click])
        setattr(raw, name, None)
        save_vocab(out, name, raw_by_dense)
        vocab[name] = len(raw_by_dense)
    del is_click
    # dense user ids follow raw ids, so this is the (raw user, ts, file order) order
    order = S.click_order(columns["user"], columns["ts"])
    for name in columns:
        columns[name] = columns[name][order]
    del order
    repeated = S.repeated_clicks(columns["user"], columns["item"], dedup)
    n_repeated = int(repeated.sum())
    if n_repeated:
        for name in columns:
            columns[name] = columns[name][~repeated]
    del repeated
    clicks = S.make_clicks(columns["user"], columns["item"], columns["category"], columns["ts"], vocab["user"])
    return clicks, vocab, n_repeated


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
        share = self.positives / max(self.rows, 1)
        return {"rows": self.rows, "positives": self.positives, "positive_share": share, "files": self.files, "row_groups": self.row_groups}


def _filter_and_write(
    out: Path, clicks: S.Clicks, draw: S.NegativeDraw, cfg: PrepareConfig, history_length: int, bounds: tuple[int, Optional[int]]
) -> tuple[Dict[str, Dict[str, Any]], List[_Tally]]:
    """Build, filter, split and write the samples chunk by chunk of clicks, so that at most
    about `samples.CHUNK` sample rows exist at a time (100M clicks make 250M samples).

    Returns the splits' summaries and the tallies after: positives, + negatives, - empty
    history, - category filter.
    """
    valid_start, test_start = bounds
    writers = {split: _PartWriter(out, split, cfg) for split in SPLITS[: 2 if test_start is None else 3]}
    # without a test split the test code never occurs
    test_start = np.iinfo(np.int64).max if test_start is None else test_start
    history = S.CategoryHistory(clicks)
    tallies = [_Tally() for _ in range(4)]
    n_clicks = len(clicks.user)
    step = max(1, S.CHUNK * n_clicks // max(n_clicks + len(draw.owner), 1))
    for start in range(0, n_clicks, step):
        chunk = S.with_negatives(clicks, draw, start, min(start + step, n_clicks))
        split = S.assign_split(chunk.ts, valid_start, test_start)
        positive = chunk.label == 1
        tallies[0].add(chunk.label[positive], split[positive])
        tallies[1].add(chunk.label, split)
        keep = S.has_history(chunk) if cfg.drop_empty_history else np.ones(len(chunk), dtype=bool)
        tallies[2].add(chunk.label[keep], split[keep])
        keep &= S.category_filter(history, chunk, cfg.category_filter, history_length, cfg.category_last_k)
        tallies[3].add(chunk.label[keep], split[keep])
        for code, writer in enumerate(writers.values()):
            writer.write(chunk.select(keep & (split == code)))
    return {split: writer.close() for split, writer in writers.items()}, tallies


def versus_paper(cfg: PrepareConfig, tallies: List[_Tally]) -> Dict[str, Any]:
    """meta["versus_paper"]: per split, the samples before the filters and after each, each
    filter's drop (the share of the split's samples it removes; None when the filter is off) and
    the validation share after the filters, each beside the paper's (`paper_counts`)."""
    splits = ("train", "valid")
    counts = [{split: tally.split()[split] for split in splits} for tally in tallies[1:]]
    filters_on = {"empty_history": cfg.drop_empty_history, "category_filter": cfg.category_filter != "none"}
    versus: Dict[str, Any] = {"source": paper_counts.SOURCE}
    for index, key in enumerate(("samples", "empty_history", "category_filter")):
        entry = {**counts[index], **{f"paper_{split}": paper_counts.COUNTS[key].get(split) for split in splits}}
        if key in filters_on:
            for split in splits:
                entry[f"{split}_drop"] = paper_counts.drop(counts[index - 1][split], counts[index][split]) if filters_on[key] else None
                entry[f"paper_{split}_drop"] = paper_counts.STATED_DROPS[key].get(split)
        versus[key] = entry
    final = counts[-1]
    versus["valid_share"] = {"ours": paper_counts.valid_share(final["train"], final["valid"]), "paper": paper_counts.PAPER_VALID_SHARE}
    return versus


def prepare(cfg: PrepareConfig, history_length: int = ModelConfig.history_length, progress: bool = True) -> Dict[str, Any]:
    """Run every stage; publish the prepared directory `cfg.out` whole; print the stage table;
    return meta. `history_length` is model.history_length: the clicks the model sees, which the
    category filter looks at (meta.json records it, and training refuses another)."""
    _check_settings(cfg, history_length)
    final = output_directory(cfg.out, "prepare.out")
    with published_directory(final, PREPARED_ENTRIES, last=META_FILE) as staging:
        meta = _prepare(cfg, history_length, staging, final, progress)
    if meta["ingest"]["header"] is not None:
        print(f"skipped the header line: {meta['ingest']['header']}")
    print(stage_table(meta))
    if meta["ingest"]["rejected"]:
        reasons = ", ".join(f"{reason}={count}" for reason, count in meta["ingest"]["rejected"].items())
        print(f"rejected: {reasons} (lines in {meta['ingest']['rejects_path']})")
    return meta


def _prepare(cfg: PrepareConfig, history_length: int, out: Path, final: Path, progress: bool) -> Dict[str, Any]:
    """Every stage, written into `out` (the staging directory of `final`); returns meta."""
    stages = _Stages(progress)

    with stages.timed("ingest"):
        raw, report = ingest(cfg.input, cfg, out / REJECTS_FILE, progress=progress)
    if report.rejects_path is not None:
        report = dataclasses.replace(report, rejects_path=str(final / REJECTS_FILE))
    fingerprint = source_fingerprint(cfg.input)
    stages.add("raw lines", report.lines)
    stages.add("ingest: valid rows", report.valid, dropped=report.lines - report.valid)

    with stages.timed("subsample"):
        if cfg.user_fraction < 1.0:
            keep = S.keep_users(raw.user, cfg.user_fraction, cfg.seed)
            raw = RawEvents(raw.user[keep], raw.item[keep], raw.category[keep], raw.behavior[keep], raw.ts[keep])
            del keep
    stages.add(f"users subsampled ({cfg.user_fraction:g})", len(raw), dropped=report.valid - len(raw))

    with stages.timed("clicks"):
        n_events = len(raw)
        clicks, vocab, n_repeated = _clicks(raw, out, cfg.dedup_clicks)
        del raw
        write_events(out, Events(clicks.item, clicks.category, clicks.ts, clicks.user_offsets))
        clicks.history_end = S.history_ends(
            clicks, cfg.history_cutoff, window_start=cfg.window_start, window_seconds=cfg.neg_window_seconds, session_gap_seconds=cfg.session_gap_seconds
        )
    n_clicks = len(clicks.user)
    stages.add("clicks (pv)", n_clicks + n_repeated, dropped=n_events - n_clicks - n_repeated)
    stages.add(f"- repeated clicks ({cfg.dedup_clicks})", n_clicks, dropped=n_repeated)
    if n_clicks == 0:
        raise UserError(f"prepare: no click (pv) row among the {n_events} rows kept of {report.valid} valid ones "
                        f"(prepare.user_fraction={cfg.user_fraction:g}); nothing was written to {cfg.out}")

    with stages.timed("negatives"):
        span = S.filter_span(cfg.category_filter, history_length, cfg.category_last_k)
        draw = S.draw_negatives(
            clicks,
            S.negative_counts(n_clicks, cfg.neg_ratio, cfg.seed),
            window_start=cfg.window_start,
            window_seconds=cfg.neg_window_seconds,
            sampling=cfg.neg_sampling,
            max_draws=cfg.neg_max_draws,
            seed=cfg.seed,
            category_span=span if cfg.neg_category == "filter" else None,
        )
    negatives = {"requested": draw.requested, "unavailable": draw.unavailable, "category": cfg.neg_category}

    bounds = split_bounds(cfg, clicks)
    with stages.timed("filter+write"):
        splits, tallies = _filter_and_write(out, clicks, draw, cfg, history_length, bounds)
    stages.add("positives", n_clicks, split=tallies[0].split())
    stages.add(
        f"+ negatives (ratio {cfg.neg_ratio:g}, {cfg.neg_sampling}, {cfg.neg_category})",
        tallies[1].rows,
        added=draw.requested,
        dropped=draw.unavailable,
        split=tallies[1].split(),
        key="samples",
    )
    stages.add(
        f"- empty history ({cfg.history_cutoff})" if cfg.drop_empty_history else "- empty history (off)",
        tallies[2].rows,
        dropped=tallies[1].rows - tallies[2].rows,
        split=tallies[2].split(),
        key="empty_history",
    )
    stages.add(
        f"- category filter ({cfg.category_filter})",
        tallies[3].rows,
        dropped=tallies[2].rows - tallies[3].rows,
        split=tallies[3].split(),
        key="category_filter",
    )
    meta = {
        "vocab": vocab,
        "num_users": len(clicks.user_offsets) - 1,
        "num_clicks": n_clicks,
        "history_length": history_length,
        "valid_start_ts": bounds[0],
        "test_start_ts": bounds[1],
        "stages": stages.rows,
        "splits": splits,
        "negatives": negatives,
        "versus_paper": versus_paper(cfg, tallies),
        "ingest": {"lines": report.lines, "valid": report.valid, "rejected": report.rejected, "rejects_path": report.rejects_path, "header": report.header},
        "source": fingerprint,
        "settings": to_dict(cfg),
        "versions": {"mdaf_dist": mdaf_dist.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "python": sys.version.split()[0]},
        "seconds": stages.seconds,
        "cpu_seconds": stages.cpu_seconds,
        "peak_rss_gb": stages.peak_rss_gb,
    }
    _check_splits(cfg, meta, clicks.ts)
    return write_meta(out, meta)


def _check_splits(cfg: PrepareConfig, meta: Dict[str, Any], ts: np.ndarray) -> None:
    """Refuse an empty split, naming the stage that emptied it: the user subsample, the time
    window (no click in the split's time range) or a filter."""
    for split, info in meta["splits"].items():
        if info["rows"]:
            continue
        counts = [row[split] for row in meta["stages"] if split in row]
        if counts[0] == 0:
            cause = (
                f"no click falls in its time range (the clicks span ts {int(ts.min())}..{int(ts.max())}; valid from "
                f"{meta['valid_start_ts']}, test from {meta['test_start_ts']}; prepare.split={cfg.split}: for an input "
                f"shorter than the window use prepare.split=fraction, or set prepare.window_start/window_days/valid_days/test_days)"
            )
        else:
            emptied = next(row["stage"] for row in meta["stages"] if split in row and row[split] == 0)
            cause = (f"the step '{emptied}' dropped all its samples (see prepare.drop_empty_history, prepare.category_filter, "
                     f"prepare.user_fraction={cfg.user_fraction:g})")
        raise UserError(f"prepare: the {split} split is empty: {cause}; nothing was written to {cfg.out}")


def _percent(share: Optional[float], sign: str = "-") -> str:
    return "" if share is None else f"{sign}{100 * share:.1f} %"


def stage_table(meta: Dict[str, Any]) -> str:
    """The stage ledger as a text table, in the spirit of MDAF_paper.md Table 6: each filter's
    drop of training samples beside the paper's (meta["versus_paper"]), then the validation share."""
    splits = list(meta["splits"])
    paper = meta["versus_paper"]
    header = ("stage", "rows", "dropped", "added", *splits, "pos %", "train Δ", "paper train", "paper train Δ")
    lines = []
    for row in meta["stages"]:
        has_split = "train" in row
        share = sum(row[f"{split}_positives"] for split in splits) / max(row["rows"], 1) if has_split else None
        versus = paper.get(row.get("key", ""), {})
        lines.append(
            (
                row["stage"],
                f"{row['rows']:,}",
                f"{row['dropped']:,}" if row["dropped"] else "",
                f"{row['added']:,}" if row["added"] else "",
                *(f"{row[split]:,}" if has_split else "" for split in splits),
                f"{100 * share:.1f}" if share is not None else "",
                _percent(versus.get("train_drop")),
                f"{versus['paper_train']:,}" if versus else "",
                _percent(versus.get("paper_train_drop")),
            )
        )
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    shares = paper["valid_share"]
    footer = (
        f"validation share after the filters: {_percent(shares['ours'], '') or 'n/a'} (paper {_percent(shares['paper'], '')}). "
        f"Paper: {paper['source']}, 0.53 % of the users of the full data (prepare.user_fraction=0.0053)"
    )
    return "\n".join([fmt(header), rule, *(fmt(cells) for cells in lines), footer])


def run(args: argparse.Namespace) -> int:
    full = load_config(args.config, args.overrides)
    cfg = full.prepare
    cfg.input = args.input or cfg.input
    cfg.out = args.out or cfg.out
    prepare(cfg, full.model.history_length, progress=not args.quiet)
    return 0
