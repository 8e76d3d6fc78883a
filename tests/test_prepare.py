"""`mdaf prepare` end to end: the stage ledger, the written layout, the CLI on the real slice."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mdaf_dist.cli import main
from mdaf_dist.config import TAOBAO_START_TS, ModelConfig, PrepareConfig
from mdaf_dist.data.layout import open_events, read_meta, sample_files
from mdaf_dist.data import paper_counts
from mdaf_dist.data.prepare import prepare
from mdaf_dist.data.synth import generate
from mdaf_dist.data.vocab import load_vocab
from mdaf_dist.errors import UserError
from mdaf_dist.studies.grid import expand
from mdaf_dist.studies.spec import load_study

SLICE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taobao_userbehavior_1h_slice.csv"
TABLE6_TINY = Path(__file__).resolve().parents[1] / "configs" / "studies" / "tiny" / "table6_filtering.yaml"


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "events.csv"
    generate(str(path), 30_000, seed=1, progress=False)
    return path


@pytest.fixture(scope="module")
def prepared(synthetic_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    cfg = PrepareConfig(input=str(synthetic_csv), out=str(out), samples_row_group=1000, samples_part_row_groups=3)
    return out, prepare(cfg, progress=False)


def read_split(out: Path, split: str):
    files = sample_files(out, split)
    return pq.ParquetDataset([str(f) for f in files]).read().to_pydict() if files else {}


def test_stage_counts_add_up_and_end_in_the_splits(prepared):
    out, meta = prepared
    stages = meta["stages"]
    assert [s["stage"] for s in stages][:4] == ["raw lines", "ingest: valid rows", "users subsampled (1)", "clicks (pv)"]
    assert stages[0]["rows"] == 30_000
    for previous, stage in zip(stages, stages[1:]):
        assert stage["rows"] == previous["rows"] - stage["dropped"] + stage["added"]
    last = stages[-1]
    assert (last["train"], last["valid"]) == (meta["splits"]["train"]["rows"], meta["splits"]["valid"]["rows"])
    assert last["train"] + last["valid"] == last["rows"]
    negatives = next(stage for stage in stages if stage.get("key") == "samples")
    assert negatives["added"] == meta["negatives"]["requested"] and negatives["dropped"] == meta["negatives"]["unavailable"]
    assert (negatives["train_positives"] + negatives["valid_positives"]) / negatives["rows"] == pytest.approx(0.4, abs=0.02)
    assert meta == read_meta(out)
    assert set(meta["versions"]) >= {"mdaf_dist", "numpy", "pyarrow"}
    assert meta["source"]["bytes"] > 0 and len(meta["source"]["sha256_name_size"]) == 16


def test_written_samples_match_meta_and_row_groups(prepared):
    out, meta = prepared
    for split in ("train", "valid"):
        files = sample_files(out, split)
        assert len(files) == meta["splits"][split]["files"] > 1
        groups = [pq.ParquetFile(f).metadata.row_group(i).num_rows for f in files for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
        assert sum(groups) == meta["splits"][split]["rows"] and groups[:-1] == [1000] * (len(groups) - 1)
        data = read_split(out, split)
        assert sum(data["label"]) == meta["splits"][split]["positives"]
        is_valid = np.array(data["ts"]) >= meta["valid_start_ts"]
        assert is_valid.all() if split == "valid" else not is_valid.any()


def test_samples_point_at_their_positive_click_in_the_events(prepared):
    out, meta = prepared
    events = open_events(out)
    # like the layout's Events.num_users, meta counts the padding user 0
    assert events.num_users == meta["num_users"] == meta["vocab"]["user"] and len(events.item) == meta["num_clicks"]
    data = read_split(out, "train")
    user, pos, item, label = (np.array(data[k]) for k in ("user", "pos", "item", "label"))
    positive = label == 1
    index = events.user_offsets[user[positive]] + pos[positive]
    assert np.array_equal(events.item[index], item[positive])
    assert (pos > 0).all() and (pos < np.diff(events.user_offsets)[user]).all()
    raw_items = load_vocab(out, "item")
    assert len(raw_items) == meta["vocab"]["item"] and raw_items[0] == -1


def test_every_written_sample_has_its_category_among_the_last_history_clicks(prepared):
    # negatives drawn to pass the category filter (the default) are kept without a look-up: the
    # filter, recomputed here from the events, must hold for every written sample all the same
    out, meta = prepared
    events = open_events(out)
    length = ModelConfig.history_length
    for split in ("train", "valid"):
        data = read_split(out, split)
        assert set(data["label"]) == {0, 1}
        for user, pos, category in zip(data["user"], data["pos"], data["category"]):
            start = events.user_offsets[user]
            assert category in events.category[start + max(0, pos - length) : start + pos]


def test_same_seed_same_output(prepared, synthetic_csv, tmp_path):
    out, meta = prepared
    again = prepare(PrepareConfig(input=str(synthetic_csv), out=str(tmp_path), samples_row_group=1000, samples_part_row_groups=3), progress=False)
    assert again["stages"] == meta["stages"]
    assert read_split(tmp_path, "valid") == read_split(out, "valid")


def test_filter_consistent_negatives_keep_the_papers_positive_share(tmp_path):
    csv = tmp_path / "events.csv"
    generate(str(csv), 30_000, seed=1, progress=False)
    shares = {}
    for neg_category in ("filter", "any"):
        meta = prepare(PrepareConfig(input=str(csv), out=str(tmp_path / neg_category), neg_category=neg_category), progress=False)
        assert meta["negatives"]["category"] == meta["settings"]["neg_category"] == neg_category
        shares[neg_category] = [meta["splits"][split]["positive_share"] for split in ("train", "valid")]
    # the filter drops about 30 % of positives but no negative, so the 40 % positives of neg_ratio
    # 1.5 fall to about a third, as on real histories (33-34 %); uniform negatives mostly fail it
    assert shares["filter"] == pytest.approx([0.33, 0.33], abs=0.03)
    assert min(shares["any"]) > 0.8


def _negatives(out: Path) -> list:
    """Every negative of the prepared directory as (user, pos, ts, item, category), sorted."""
    rows = {split: read_split(out, split) for split in ("train", "valid")}
    return sorted(
        key
        for split in rows.values()
        for key, label in zip(zip(split["user"], split["pos"], split["ts"], split["item"], split["category"]), split["label"])
        if label == 0
    )


def _contains_all(looser: list, stricter: list) -> bool:
    """Multiset inclusion."""
    return not Counter(stricter) - Counter(looser)


def test_table6_rows_share_their_negatives_and_print_their_drops_beside_the_papers(synthetic_csv, tmp_path, capsys):
    """Table 6's rows as its tiny study resolves them: the paper's protocol draws negatives once,
    before the filters, so each stricter row keeps a subset of the looser row's negatives."""
    plan = expand(load_study(str(TABLE6_TINY)))
    rows = {}
    for cell in (c for c in plan.cells if c.seed == plan.study.file.seeds[0]):
        cfg = cell.config.prepare
        assert cfg.neg_category == "any" and cfg.user_fraction == 1.0
        cfg.input, cfg.out = str(synthetic_csv), str(tmp_path / cell.id)
        rows[next(iter(cell.coords.values()))] = (Path(cfg.out), prepare(cfg, cell.config.model.history_length, progress=False))
    printed = capsys.readouterr().out
    raw, empty_removed, filtered = (rows[label] for label in ("Raw data", "+ Empty sequence removal", "+ Category filtering"))
    negatives = [_negatives(out) for out, _ in (raw, empty_removed, filtered)]
    assert len(negatives[2]) < len(negatives[1]) < len(negatives[0])
    assert _contains_all(negatives[0], negatives[1]) and _contains_all(negatives[1], negatives[2])
    # drawn alike: the raw row's negatives with a history are exactly the next row's
    assert [n for n in negatives[0] if n[1] > 0] == negatives[1]

    versus = filtered[1]["versus_paper"]
    stages = {row.get("key"): row for row in filtered[1]["stages"]}
    for key, before, after in (("empty_history", "samples", "empty_history"), ("category_filter", "empty_history", "category_filter")):
        assert versus[key]["train_drop"] == pytest.approx(1 - stages[after]["train"] / stages[before]["train"])
    assert versus["category_filter"]["valid_drop"] == pytest.approx(1 - stages["category_filter"]["valid"] / stages["empty_history"]["valid"])
    assert (versus["empty_history"]["paper_train_drop"], versus["category_filter"]["paper_train_drop"]) == (0.130, 0.483)
    assert versus["valid_share"]["paper"] == pytest.approx(101_609 / (473_044 + 101_609)) == paper_counts.PAPER_VALID_SHARE
    for key, paper_train, paper_valid in (("samples", 1_052_081, None), ("empty_history", 915_915, 196_361), ("category_filter", 473_044, 101_609)):
        assert {name: versus[key][name] for name in ("train", "valid", "paper_train", "paper_valid")} == {
            "train": stages[key]["train"], "valid": stages[key]["valid"], "paper_train": paper_train, "paper_valid": paper_valid
        }
    # a filter that is off has no drop to compare
    assert raw[1]["versus_paper"]["empty_history"]["train_drop"] is None and raw[1]["versus_paper"]["category_filter"]["train_drop"] is None
    # the stage table prints each drop beside the paper's, and the validation share
    empty_line = next(line for line in printed.splitlines() if line.startswith("- empty history (click)"))
    assert empty_line.split()[-5:] == [f"-{100 * versus['empty_history']['train_drop']:.1f}", "%", "915,915", "-13.0", "%"]
    category_line = next(line for line in printed.splitlines() if line.startswith("- category filter (last_l)"))
    assert category_line.split()[-5:] == [f"-{100 * versus['category_filter']['train_drop']:.1f}", "%", "473,044", "-48.3", "%"]
    assert f"validation share after the filters: {100 * versus['valid_share']['ours']:.1f} % (paper 17.7 %)" in printed


def test_filter_drawn_negatives_change_with_the_filter(synthetic_csv, tmp_path):
    """The old protocol, still a setting: negatives drawn to pass the filter differ from the
    unfiltered row's, so a Table 6 built on it changes negatives and filter at once."""
    outs = {}
    for category_filter in ("none", "last_l"):
        out = tmp_path / category_filter
        prepare(PrepareConfig(input=str(synthetic_csv), out=str(out), neg_category="filter", category_filter=category_filter), progress=False)
        outs[category_filter] = _negatives(out)
    assert not _contains_all(outs["none"], outs["last_l"])


def test_dedup_and_history_cutoff_are_counted_and_written(synthetic_csv, tmp_path):
    meta = prepare(PrepareConfig(input=str(synthetic_csv), out=str(tmp_path), dedup_clicks="user_item", history_cutoff="window"), progress=False)
    repeated = next(stage for stage in meta["stages"] if stage["stage"] == "- repeated clicks (user_item)")
    assert repeated["dropped"] > 0 and repeated["rows"] == meta["num_clicks"]
    events = open_events(tmp_path)
    for user in range(1, len(events.user_offsets) - 1):
        items = events.item[events.user_offsets[user] : events.user_offsets[user + 1]].tolist()
        assert len(items) == len(set(items))
    # every written sample's history ends before the sample's day
    train = read_split(tmp_path, "train")
    for user, pos, ts in list(zip(train["user"], train["pos"], train["ts"]))[:2000]:
        if pos:
            last_history_ts = int(events.ts[events.user_offsets[user] + pos - 1])
            assert (last_history_ts - meta["settings"]["window_start"]) // 86400 < (ts - meta["settings"]["window_start"]) // 86400


def test_user_fraction_keeps_about_that_share_of_users(synthetic_csv, tmp_path):
    meta = prepare(PrepareConfig(input=str(synthetic_csv), out=str(tmp_path), user_fraction=0.3, category_filter="none"), progress=False)
    full_users = len(np.unique(np.loadtxt(synthetic_csv, delimiter=",", usecols=0, dtype=np.int64)))
    subsample = meta["stages"][2]
    assert subsample["stage"] == "users subsampled (0.3)" and subsample["dropped"] > 0
    assert (meta["vocab"]["user"] - 1) / full_users == pytest.approx(0.3, abs=0.05)


def test_missing_output_is_a_user_error(synthetic_csv):
    with pytest.raises(UserError, match=r"no output directory: pass --out DIR \(or prepare.out=DIR\)"):
        prepare(PrepareConfig(input=str(synthetic_csv)), progress=False)


@pytest.mark.skipif(not SLICE.is_file(), reason="real data slice not present")
def test_cli_on_the_real_slice_prints_the_table_and_reports_the_ts_15_row(tmp_path, capsys):
    # the slice is one hour of one day: nothing falls in the validation day, so the default split fails
    args = ["prepare", "--input", str(SLICE), "--out", str(tmp_path), "--quiet", "prepare.neg_ratio=2", "prepare.category_filter=any"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("mdaf prepare: error: prepare: the valid split is empty: no click falls in its time range")
    assert "use prepare.split=fraction" in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    code = main([*args, "prepare.split=fraction", "prepare.test_fraction=0"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "ingest: valid rows" in printed and "- category filter (any)" in printed
    assert "rejected: ts_outside_window=1" in printed
    meta = read_meta(tmp_path)
    assert meta["ingest"]["rejected"] == {"ts_outside_window": 1}
    assert meta["stages"][1]["dropped"] == 1 and meta["settings"]["neg_ratio"] == 2.0
    rejects = (tmp_path / "rejects.csv").read_text().splitlines()
    assert len(rejects) == 2 and rejects[1].startswith("96169,ts_outside_window,") and rejects[1].endswith(',pv,15"')


def _split_times(out: Path, meta) -> dict:
    """(first ts, last ts) of every split prepared in `out`."""
    times = {}
    for split in meta["splits"]:
        ts = np.array(read_split(out, split)["ts"])
        assert len(ts) == meta["splits"][split]["rows"] > 0
        times[split] = (ts.min(), ts.max())
    return times


def test_test_days_hold_out_the_last_days_with_no_time_overlap(synthetic_csv, tmp_path):
    meta = prepare(PrepareConfig(input=str(synthetic_csv), out=str(tmp_path), valid_days=1, test_days=1), progress=False)
    times = _split_times(tmp_path, meta)
    assert list(times) == ["train", "valid", "test"]
    assert times["train"][1] < meta["valid_start_ts"] <= times["valid"][0]
    assert times["valid"][1] < meta["test_start_ts"] <= times["test"][0]
    assert meta["test_start_ts"] == meta["valid_start_ts"] + 86400
    last = meta["stages"][-1]
    assert last["train"] + last["valid"] + last["test"] == last["rows"]
    assert last["test_positives"] == meta["splits"]["test"]["positives"]


@pytest.mark.skipif(not SLICE.is_file(), reason="real data slice not present")
def test_split_fraction_on_the_one_hour_slice_gives_three_splits(tmp_path, capsys):
    code = main(["prepare", "--input", str(SLICE), "--out", str(tmp_path), "--quiet", "prepare.category_filter=any",
                 "prepare.split=fraction", "prepare.valid_fraction=0.2", "prepare.test_fraction=0.2"])  # fmt: skip
    assert code == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["stage", "rows", "dropped", "added", "train", "valid", "test", "pos", "%", "train", "Δ", "paper", "train", "paper", "train", "Δ"]
    meta = read_meta(tmp_path)
    times = _split_times(tmp_path, meta)
    assert times["train"][1] < times["valid"][0] and times["valid"][1] < times["test"][0]
    # the cuts sit at 60 % and 80 % of the seconds the clicks span
    ts = open_events(tmp_path).ts
    span = int(ts.max()) - int(ts.min()) + 1
    assert meta["valid_start_ts"] == pytest.approx(ts.min() + 0.6 * span, abs=1)
    assert meta["test_start_ts"] == pytest.approx(ts.min() + 0.8 * span, abs=1)


def test_unknown_split_mode_is_one_line_error(tmp_path, capsys):
    assert main(["prepare", "--input", "x.csv", "--out", str(tmp_path), "prepare.split=weeks"]) == 2
    assert capsys.readouterr().err.strip() == "mdaf prepare: error: prepare.split='weeks' is not one of: days, fraction"


def test_cli_bad_override_is_one_line_error(tmp_path, capsys):
    code = main(["prepare", "--input", "x.csv", "--out", str(tmp_path), "prepare.category_filter=sometimes"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "mdaf prepare: error: prepare.category_filter='sometimes' is not one of: last_l, any, last_k, none"
    )


def test_cli_missing_input_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert main(["prepare", "--input", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"mdaf prepare: error: input not found: {missing}"


def test_rerun_replaces_what_prepare_owns_and_keeps_the_users_files(synthetic_csv, tmp_path, capsys):
    out = tmp_path / "data"
    bad_input = tmp_path / "with_bad_line.csv"
    bad_input.write_bytes(synthetic_csv.read_bytes() + b"not,a,row\n")
    prepare(PrepareConfig(input=str(bad_input), out=str(out), test_days=1, max_bad_fraction=0.01), progress=False)
    assert sample_files(out, "test") and (out / "rejects.csv").is_file()
    (out / "notes.txt").write_text("mine")
    meta = prepare(PrepareConfig(input=str(synthetic_csv), out=str(out)), progress=False)
    # no test split and no rejected line this time: the old ones are gone, not mixed in
    assert sample_files(out, "test") == [] and not (out / "samples" / "test").exists()
    assert not (out / "rejects.csv").exists() and meta["ingest"]["rejects_path"] is None
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "with_bad_line.csv"]  # no staging directory left
    assert read_meta(out, checksums=True) == meta and "notes.txt" not in meta["files"]


def test_meta_lists_every_file_and_readers_refuse_a_mismatch(prepared, tmp_path):
    out, meta = prepared
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(meta["files"]) == written and all(len(entry["sha256"]) == 64 for entry in meta["files"].values())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    part = sample_files(copy, "train")[0]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    read_meta(copy)  # same size: only the checksums see it
    name = part.relative_to(copy).as_posix()
    with pytest.raises(UserError, match=f"^{copy} is a damaged prepared data directory: {name} does not match its SHA-256"):
        read_meta(copy, checksums=True)
    part.write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match=f"^{copy} is a damaged prepared data directory: {name} has {len(data) - 10} bytes, its manifest says {len(data)}$"):
        read_meta(copy)
    (copy / "events.arrow").unlink()
    with pytest.raises(UserError, match=f"^{copy} is not a complete prepared data directory: events.arrow is missing$"):
        read_meta(copy)


def test_prepare_killed_midway_leaves_the_old_data_intact(synthetic_csv, tmp_path):
    out = tmp_path / "data"
    old = prepare(PrepareConfig(input=str(synthetic_csv), out=str(out)), progress=False)
    bigger = tmp_path / "bigger.csv"
    generate(str(bigger), 400_000, seed=2, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "mdaf_dist.cli", "prepare", "--input", str(bigger), "--out", str(out), "--quiet"], env=env)
    staging = tmp_path / f".data.tmp-{process.pid}"
    deadline = time.monotonic() + 120
    while not (staging / "events.arrow").exists():  # killed once it has written into its staging directory
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert read_meta(out, checksums=True) == old
    assert len(read_split(out, "train")["user"]) == old["splits"]["train"]["rows"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"user_fraction": 1e-9}, r"prepare: no click \(pv\) row among the 0 rows kept of 40 valid ones \(prepare.user_fraction=1e-09\)"),
        ({"window_days": 30, "drop_empty_history": False, "category_filter": "none"}, r"prepare: the valid split is empty: no click falls in its time range \(the clicks span ts \d+\.\.\d+; valid from \d+"),
        ({}, r"prepare: the train split is empty: the step '- empty history \(click\)' dropped all its samples"),
    ],
    ids=["user_fraction", "time_window", "filters"],
)
def test_an_empty_split_fails_naming_its_cause_and_writes_nothing(tmp_path, settings, message):
    # 40 users with one click each, on the first and on the last day: no click has a history
    raw = tmp_path / "raw.csv"
    day = 86400
    raw.write_text("".join(f"{user},{user},1,pv,{TAOBAO_START_TS + (user % 2) * 8 * day + 60}\n" for user in range(1, 41)))
    out = tmp_path / "data"
    with pytest.raises(UserError, match=f"^{message}.*; nothing was written to {out}$"):
        prepare(PrepareConfig(input=str(raw), out=str(out), **settings), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv"]


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_max_bad_fraction_outside_0_1_is_refused(synthetic_csv, tmp_path, value):
    with pytest.raises(UserError, match=rf"^prepare.max_bad_fraction must be in \[0, 1\], got {value}$"):
        prepare(PrepareConfig(input=str(synthetic_csv), out=str(tmp_path), max_bad_fraction=value), progress=False)


def test_file_uri_output_is_the_local_directory(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare(PrepareConfig(input=synthetic_csv.as_uri(), out=(tmp_path / "data").as_uri()), progress=False)
    assert read_meta(tmp_path / "data")["splits"]["train"]["rows"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no folder named "file:"
