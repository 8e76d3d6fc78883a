"""Prepare in partitions: the same data whatever the partitioning, in worker processes or as
`--partition I/N` tasks joined by `--merge`; bad partitionings refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mdaf_dist.cli import main
from mdaf_dist.config import PrepareConfig
from mdaf_dist.data import partitions as P
from mdaf_dist.data.layout import EVENTS_FILE, OFFSETS_FILE, read_meta, sample_files
from mdaf_dist.data.prepare import prepare
from mdaf_dist.data.synth import generate
from mdaf_dist.errors import UserError

SLICE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taobao_userbehavior_1h_slice.csv"
SAME_BYTES = (EVENTS_FILE, OFFSETS_FILE, "vocab/user.npy", "vocab/item.npy", "vocab/category.npy")
# meta entries that say how the run went, not what it wrote
RUN_ENTRIES = ("settings", "partitions", "splits", "seconds", "cpu_seconds", "peak_rss_gb", "files")


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "events.csv"
    generate(str(path), 20_000, seed=3, progress=False)
    return path


def sample_rows(out: Path, split: str) -> list:
    """Every sample row of a split, sorted: the split as a multiset of rows."""
    table = pq.ParquetDataset([str(f) for f in sample_files(out, split)]).read()
    return sorted(zip(*(table.column(name).to_pylist() for name in table.column_names)))


def what_was_written(meta: dict) -> dict:
    """meta without what differs between two output directories and runs."""
    return {**{k: v for k, v in meta.items() if k not in RUN_ENTRIES}, "ingest": {**meta["ingest"], "rejects_path": None}}


def assert_same_data(a: Path, b: Path, meta_a: dict, meta_b: dict) -> None:
    for name in SAME_BYTES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert what_was_written(meta_a) == what_was_written(meta_b)
    # each partition writes its own part files: their number differs, not the rows
    assert [(s["rows"], s["positives"]) for s in meta_a["splits"].values()] == [(s["rows"], s["positives"]) for s in meta_b["splits"].values()]
    for split in meta_a["splits"]:
        rows = sample_rows(a, split)
        assert len(rows) == meta_a["splits"][split]["rows"] > 0
        assert rows == sample_rows(b, split)


@pytest.mark.parametrize("settings", [
    {},
    {"dedup_clicks": "consecutive", "neg_sampling": "popularity", "neg_category": "any", "history_cutoff": "window", "test_days": 1},
], ids=["defaults", "other_settings"])  # fmt: skip
def test_partitioned_prepare_equals_one_partition(synthetic_csv, tmp_path, settings):
    base = PrepareConfig(input=str(synthetic_csv), samples_row_group=500, **settings)
    one = prepare(dataclasses.replace(base, out=str(tmp_path / "one"), partitions=1), progress=False)
    # five partitions, two worker processes at a time
    five = prepare(dataclasses.replace(base, out=str(tmp_path / "five"), partitions=5, workers=2), progress=False)
    assert (one["partitions"], five["partitions"]) == (1, 5)
    assert_same_data(tmp_path / "one", tmp_path / "five", one, five)
    assert len(sample_files(tmp_path / "five", "train")) >= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five", "one"]  # no spill or work directory left


@pytest.mark.skipif(not SLICE.is_file(), reason="the real data slice is not available")
def test_partitioned_prepare_equals_one_partition_on_the_real_slice(tmp_path):
    base = PrepareConfig(input=str(SLICE), split="fraction", test_fraction=0.0, category_filter="any")
    one = prepare(dataclasses.replace(base, out=str(tmp_path / "one"), partitions=1), progress=False)
    three = prepare(dataclasses.replace(base, out=str(tmp_path / "three"), partitions=3, workers=1), progress=False)
    assert one["ingest"]["rejected"] == {"ts_outside_window": 1}
    assert_same_data(tmp_path / "one", tmp_path / "three", one, three)
    assert (tmp_path / "one" / "rejects.csv").read_bytes() == (tmp_path / "three" / "rejects.csv").read_bytes()


def test_partition_tasks_and_merge_equal_the_worker_run(synthetic_csv, tmp_path, capsys):
    local = prepare(PrepareConfig(input=str(synthetic_csv), out=str(tmp_path / "local"), partitions=3, workers=1), progress=False)
    out = tmp_path / "tasks"
    for index in (2, 0, 1):
        assert main(["prepare", "--input", str(synthetic_csv), "--out", str(out), "--quiet", "--partition", f"{index}/3"]) == 0
    assert f"partition 1/3 written to {out}.partitions/part-00001-of-00003" in capsys.readouterr().out
    assert main(["prepare", "--out", str(out), "--quiet", "--merge"]) == 0
    merged = read_meta(out, checksums=True)
    # task I is the worker run's partition I: every file is the same, sample files included
    assert merged["files"] == local["files"]
    assert_same_data(tmp_path / "local", out, local, merged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "tasks"]  # the partitions are merged away


def test_bad_partition_is_one_line(synthetic_csv, tmp_path, capsys):
    assert main(["prepare", "--input", str(synthetic_csv), "--out", str(tmp_path / "d"), "--partition", "3/2"]) == 2
    assert capsys.readouterr().err == "mdaf prepare: error: --partition 3/2: expected I/N with 0 <= I < N, e.g. 0/4 for the first of four partitions\n"


def test_merge_with_a_missing_partition_is_one_line(synthetic_csv, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["prepare", "--out", str(out), "--merge"]) == 2
    assert capsys.readouterr().err == (
        f"mdaf prepare: error: prepare --merge: no partition in {out}.partitions; run `mdaf prepare --partition I/N` for I = 0..N-1 first\n"
    )
    for index in (0, 2):
        assert main(["prepare", "--input", str(synthetic_csv), "--out", str(out), "--quiet", "--partition", f"{index}/3"]) == 0
    capsys.readouterr()
    assert main(["prepare", "--out", str(out), "--merge"]) == 2
    missing = out.parent / "d.partitions" / "part-00001-of-00003"
    assert capsys.readouterr().err == (
        f"mdaf prepare: error: prepare --merge: partition 1/3 is missing ({missing}); run `mdaf prepare --partition 1/3` first\n"
    )
    assert not out.exists()


def test_merge_refuses_partitions_prepared_with_other_settings(synthetic_csv, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["prepare", "--input", str(synthetic_csv), "--out", str(out), "--quiet", "--partition", "0/2"]) == 0
    assert main(["prepare", "--input", str(synthetic_csv), "--out", str(out), "--quiet", "--partition", "1/2", "prepare.neg_ratio=2"]) == 0
    capsys.readouterr()
    assert main(["prepare", "--out", str(out), "--merge"]) == 2
    assert capsys.readouterr().err == (
        "mdaf prepare: error: prepare --merge: partition 1/2 was prepared with other settings than partition 0/2; "
        "run `mdaf prepare --partition 1/2` again with partition 0's\n"
    )


def test_the_memory_budget_sets_the_partitions(synthetic_csv, tmp_path):
    cfg = PrepareConfig(input=str(synthetic_csv), workers=2)
    shared = P.scan(cfg, tmp_path / "rejects.csv", tmp_path / "spill", P.BUCKETS, progress=False)
    assert P.plan_partitions(cfg, shared) == 1  # 18K clicks: not worth a second process
    shared.scan["clicks"] = 10_000_000  # as if the input were larger: the shared tables are small beside the partitions
    clicks = shared.scan["clicks"]

    def budget(partitions: int) -> float:
        """GB for two workers of these partitions and the main process, without the shared tables."""
        return (2 * (clicks * P.BYTES_PER_CLICK / partitions + P.WORKER_BASE_BYTES) + P.MAIN_BASE_BYTES) / 2**30

    # the partitions are as few as fit the budget (the shared tables take a little more), one per
    # worker at least when the clicks are enough to be worth it
    assert P.plan_partitions(dataclasses.replace(cfg, memory_gb=100.0), shared) == 2
    assert P.plan_partitions(dataclasses.replace(cfg, memory_gb=100.0, workers=1), shared) == 1
    assert P.plan_partitions(dataclasses.replace(cfg, memory_gb=budget(4) * 1.05), shared) == 4
    assert P.plan_partitions(dataclasses.replace(cfg, memory_gb=budget(4) * 1.05, partitions=7), shared) == 7
    with pytest.raises(UserError, match=r"^prepare.memory_gb=0.3 is too small for 10,000,000 clicks on 2 workers \(they need at least 0.6\d GB\): "
                                        r"raise it or lower prepare.workers$"):
        P.plan_partitions(dataclasses.replace(cfg, memory_gb=0.3), shared)


def test_user_buckets_are_even_and_fixed_by_the_raw_id():
    users = np.arange(1, 200_001, dtype=np.int64) * 7
    buckets = P.user_buckets(users, 8)
    assert np.bincount(buckets, minlength=8) == pytest.approx(np.full(8, 25_000), rel=0.03)
    assert np.array_equal(P.user_buckets(users[::-1], 8), buckets[::-1])


def test_ids_beyond_the_packed_range_are_one_line(tmp_path, capsys):
    raw = tmp_path / "raw.csv"
    raw.write_text(f"1,{2**25},3,pv,1511544070\n1,5,3,pv,1511544071\n")
    assert main(["prepare", "--input", str(raw), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"mdaf prepare: error: {raw}: prepare packs (window, category, item) into 64 bits: item and category ids must be below 2**25 "
        "and timestamps within 2048 windows of prepare.neg_window_seconds from prepare.window_start (keep prepare.check_window=true)\n"
    )
