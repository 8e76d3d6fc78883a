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
   Stages 3-8 run partition by partition of the users (`mdaf_dist.data.partitions`, within
   `prepare.memory_gb`), and within a partition 6-8 and the writing chunk by chunk of clicks:
   all samples (2.5 per click) are never in memory at once. Each filter's drop of training samples is printed beside the
   paper's (`paper_counts`), and kept in meta["versus_paper"] with the validation share.

Output: `mdaf_dist.data.layout` (events.arrow, user_offsets.npy, samples/{train,valid[,test]}/part-*.parquet
in production order per partition, meta.json). The loader shuffles; samples are written grouped by user and
time, a positive followed by its negatives. Everything is written into a temporary sibling of the
output directory and moved into place when complete, meta.json (with every file's size and
SHA-256) last: a prepare that fails or is killed leaves the previous data intact or refused by
readers, never a mix; a stale split or rejects file of an earlier run is replaced, the user's own
files in the directory are left alone. A split it must make that ends up empty fails the run,
naming the stage that emptied it.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import fsspec
import numpy as np
import pyarrow as pa

import mdaf_dist
from mdaf_dist.config import ModelConfig, PrepareConfig, load_config, to_dict
from mdaf_dist.data import paper_counts
from mdaf_dist.data import partitions as P
from mdaf_dist.data import samples as S
from mdaf_dist.data.layout import META_FILE, PREPARED_ENTRIES, REJECTS_FILE, SPLITS, write_meta
from mdaf_dist.errors import UserError
from mdaf_dist.files import output_directory, published_directory, read_json

# settings that say where and how prepare runs, not what it writes
RUN_SETTINGS = ("out", "workers", "memory_gb", "partitions")


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
    if not cfg.memory_gb > 0 or cfg.workers < 0 or cfg.partitions < 0:
        raise UserError(f"prepare.memory_gb must be > 0 and prepare.workers, prepare.partitions >= 0 (0: chosen), "
                        f"got {cfg.memory_gb}, {cfg.workers}, {cfg.partitions}")
    if cfg.block_size_bytes < 1:
        raise UserError(f"prepare.block_size_bytes must be >= 1, got {cfg.block_size_bytes}")


def split_bounds(cfg: PrepareConfig, ts_range: tuple[int, int]) -> tuple[int, Optional[int]]:
    """(first validation ts, first test ts or None without a test split), by `prepare.split`
    (`ts_range`: the clicks' first and last ts)."""
    if cfg.split == "days":
        valid_start, test_start = S.split_bounds_by_days(cfg.window_start, cfg.window_days, cfg.valid_days, cfg.test_days)
        has_test = cfg.test_days > 0
    else:
        valid_start, test_start = S.split_bounds_by_fraction(*ts_range, cfg.valid_fraction, cfg.test_fraction)
        has_test = cfg.test_fraction > 0
    return valid_start, test_start if has_test else None


def source_fingerprint(source: str) -> Dict[str, Any]:
    """Name, size and a hash of both: cheap to compute for 3.7 GB, enough to tell inputs apart."""
    fs, path = fsspec.core.url_to_fs(source)
    name, size = Path(path).name, int(fs.size(path))
    digest = hashlib.sha256(f"{name}\0{size}".encode()).hexdigest()[:16]
    return {"name": name, "bytes": size, "sha256_name_size": digest}


def versus_paper(cfg: PrepareConfig, tallies: np.ndarray) -> Dict[str, Any]:
    """meta["versus_paper"]: per split, the samples before the filters and after each, each
    filter's drop (the share of the split's samples it removes; None when the filter is off) and
    the validation share after the filters, each beside the paper's (`paper_counts`)."""
    splits = ("train", "valid")
    counts = [{split: _split(tally)[split] for split in splits} for tally in tallies[1:]]
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


def _split(tally: np.ndarray) -> Dict[str, int]:
    """A row of `partitions.Totals.tallies` by name: rows, then positives, per split."""
    return dict(zip(SPLITS + tuple(f"{name}_positives" for name in SPLITS), map(int, tally)))


def prepare(cfg: PrepareConfig, history_length: int = ModelConfig.history_length, progress: bool = True) -> Dict[str, Any]:
    """Run every stage on this machine, the partitions `prepare.workers` at a time; publish the
    prepared directory `cfg.out` whole; print the stage table; return meta. `history_length` is
    model.history_length: the clicks the model sees, which the category filter looks at (meta.json
    records it, and training refuses another)."""
    _check_settings(cfg, history_length)
    final = output_directory(cfg.out, "prepare.out")
    stages = _Stages(progress)
    buckets = cfg.partitions or P.BUCKETS
    with published_directory(final, PREPARED_ENTRIES, last=META_FILE) as staging:
        work = staging / ".work"  # spills and partitions, removed before the manifest
        with stages.timed("ingest"):
            shared = P.scan(cfg, staging / REJECTS_FILE, work / "spill", buckets, progress=progress)
        partitions = P.plan_partitions(cfg, shared)
        bounds = split_bounds(cfg, shared.ts_range)
        with stages.timed("partitions"):
            parts = P.prepare_partitions(cfg, history_length, shared, work / "shared", work / "spill", buckets, partitions, bounds, work)
        with stages.timed("merge"):
            totals = P.merge(shared, parts, staging)
        shutil.rmtree(work)
        meta = write_meta(staging, _meta(cfg, history_length, shared, totals, bounds, stages, final, partitions))
    _print_summary(meta)
    return meta


def prepare_task(cfg: PrepareConfig, history_length: int, index: int, count: int, progress: bool = True) -> None:
    """`mdaf prepare --partition I/N`: the whole input read, partition I of N prepared and
    published in DIR.partitions/ for `merge_tasks`."""
    _check_settings(cfg, history_length)
    final = output_directory(cfg.out, "prepare.out")
    target = P.task_directory(final, index, count)
    with published_directory(target, P.TASK_ENTRIES, last=P.SUMMARY_FILE) as staging:
        shared = P.scan(cfg, staging / REJECTS_FILE, staging / "spill", count, keep=index, progress=progress)
        shared.scan["source"] = source_fingerprint(cfg.input)
        shared.scan["settings"] = to_dict(cfg)
        shared.scan["history_length"] = history_length
        shared.save(staging)
        spill = sorted((staging / "spill").glob("bucket-*.bin"))
        P.prepare_partition(cfg, history_length, shared, spill, split_bounds(cfg, shared.ts_range), staging)
        shutil.rmtree(staging / "spill")
    print(f"prepare: partition {index}/{count} written to {target}; when all {count} are, run `mdaf prepare --merge --out {cfg.out}`")


def merge_tasks(out: str, progress: bool = True) -> Dict[str, Any]:
    """`mdaf prepare --merge`: the partitions of `prepare_task` joined into the prepared
    directory `out`, as `prepare` would have written it; the partitions are removed."""
    if not out:
        raise UserError("no output directory: pass --out DIR (or prepare.out=DIR)")
    final = output_directory(out, "prepare.out")
    parts = P.task_directories(final)
    scans = [read_json(part / P.SCAN_FILE, "partition scan") for part in parts]
    first = _task_identity(scans[0])
    for index, other in enumerate(scans):
        for key, value in _task_identity(other).items():
            if value != first[key]:
                raise UserError(f"prepare --merge: partition {index}/{len(parts)} was prepared with other {key} than partition 0/{len(parts)}; "
                                f"run `mdaf prepare --partition {index}/{len(parts)}` again with partition 0's")
    cfg = PrepareConfig(**{**scans[0]["settings"], "out": out})
    shared = P.Shared.load(parts[0])
    stages = _Stages(progress)
    with published_directory(final, PREPARED_ENTRIES, last=META_FILE) as staging:
        if (parts[0] / REJECTS_FILE).is_file():
            shutil.copyfile(parts[0] / REJECTS_FILE, staging / REJECTS_FILE)
        with stages.timed("merge"):
            totals = P.merge(shared, parts, staging)
        meta = write_meta(staging, _meta(cfg, scans[0]["history_length"], shared, totals, split_bounds(cfg, shared.ts_range), stages, final, len(parts)))
    shutil.rmtree(parts[0].parent)
    _print_summary(meta)
    return meta


def _task_identity(scan: Dict[str, Any]) -> Dict[str, Any]:
    """What the tasks of one partitioning share: input, settings, what the scan saw."""
    return {
        "input": scan["source"],
        "settings": {key: value for key, value in scan["settings"].items() if key not in RUN_SETTINGS},
        "model.history_length": scan["history_length"],
        "ingest counts": {key: value for key, value in scan["ingest"].items() if key != "rejects_path"},
    }


def _print_summary(meta: Dict[str, Any]) -> None:
    if meta["ingest"]["header"] is not None:
        print(f"skipped the header line: {meta['ingest']['header']}")
    print(stage_table(meta))
    if meta["ingest"]["rejected"]:
        reasons = ", ".join(f"{reason}={count}" for reason, count in meta["ingest"]["rejected"].items())
        print(f"rejected: {reasons} (lines in {meta['ingest']['rejects_path']})")


def _meta(cfg: PrepareConfig, history_length: int, shared: P.Shared, totals: P.Totals, bounds: tuple[int, Optional[int]], stages: _Stages, final: Path,
          partitions: int) -> Dict[str, Any]:
    """meta.json (without its file list): the stage ledger from the scan's and the partitions' counts."""
    scan = shared.scan
    ingest = {**scan["ingest"], "rejects_path": str(final / REJECTS_FILE) if scan["ingest"]["rejects_path"] else None}
    stages.add("raw lines", ingest["lines"])
    stages.add("ingest: valid rows", ingest["valid"], dropped=ingest["lines"] - ingest["valid"])
    stages.add(f"users subsampled ({cfg.user_fraction:g})", scan["events"], dropped=ingest["valid"] - scan["events"])
    stages.add("clicks (pv)", scan["clicks"], dropped=scan["events"] - scan["clicks"])
    stages.add(f"- repeated clicks ({cfg.dedup_clicks})", totals.clicks, dropped=totals.repeated)
    tallies = totals.tallies
    stages.add("positives", totals.clicks, split=_split(tallies[0]))
    rows = tallies[:, : len(SPLITS)].sum(axis=1)
    stages.add(
        f"+ negatives (ratio {cfg.neg_ratio:g}, {cfg.neg_sampling}, {cfg.neg_category})",
        rows[1],
        added=totals.requested,
        dropped=totals.unavailable,
        split=_split(tallies[1]),
        key="samples",
    )
    stages.add(
        f"- empty history ({cfg.history_cutoff})" if cfg.drop_empty_history else "- empty history (off)",
        rows[2],
        dropped=rows[1] - rows[2],
        split=_split(tallies[2]),
        key="empty_history",
    )
    stages.add(f"- category filter ({cfg.category_filter})", rows[3], dropped=rows[2] - rows[3], split=_split(tallies[3]), key="category_filter")
    meta = {
        "vocab": {name: len(raw_by_dense) for name, raw_by_dense in shared.vocab.items()},
        "num_users": len(shared.vocab["user"]),
        "num_clicks": totals.clicks,
        "history_length": history_length,
        "valid_start_ts": bounds[0],
        "test_start_ts": bounds[1],
        "stages": stages.rows,
        "splits": totals.splits,
        "negatives": {"requested": totals.requested, "unavailable": totals.unavailable, "category": cfg.neg_category},
        "versus_paper": versus_paper(cfg, tallies),
        "ingest": ingest,
        "source": scan.get("source") or source_fingerprint(cfg.input),
        "settings": to_dict(cfg),
        "partitions": partitions,
        "versions": {"mdaf_dist": mdaf_dist.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "python": sys.version.split()[0]},
        "seconds": stages.seconds,
        "cpu_seconds": stages.cpu_seconds,
        "peak_rss_gb": stages.peak_rss_gb,
    }
    _check_splits(cfg, meta, shared.ts_range)
    return meta


def _check_splits(cfg: PrepareConfig, meta: Dict[str, Any], ts_range: tuple[int, int]) -> None:
    """Refuse an empty split, naming the stage that emptied it: the user subsample, the time
    window (no click in the split's time range) or a filter."""
    for split, info in meta["splits"].items():
        if info["rows"]:
            continue
        counts = [row[split] for row in meta["stages"] if split in row]
        if counts[0] == 0:
            cause = (
                f"no click falls in its time range (the clicks span ts {ts_range[0]}..{ts_range[1]}; valid from "
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
    if args.merge:
        merge_tasks(cfg.out, progress=not args.quiet)
    elif args.partition:
        prepare_task(cfg, full.model.history_length, *P.parse_partition(args.partition), progress=not args.quiet)
    else:
        prepare(cfg, full.model.history_length, progress=not args.quiet)
    return 0
