"""The synthetic UserBehavior generator: format, determinism, the real data set's statistics and the planted signals."""

import gzip
import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mdaf_dist import cli
from mdaf_dist.config import SECONDS_PER_DAY, TAOBAO_START_TS, PrepareConfig
from mdaf_dist.data import stats, synth
from mdaf_dist.data.prepare import prepare
from mdaf_dist.errors import UserError

COLUMNS = ["user", "item", "category", "behavior", "ts"]


def read_rows(path):
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=COLUMNS))
    return {name: table[name].to_numpy(zero_copy_only=False) for name in COLUMNS}


@pytest.fixture(scope="module")
def default_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "default.csv"
    summary = synth.generate(str(path), 200_000, seed=7, progress=False)
    return path, summary


@pytest.fixture(scope="module")
def default_rows(default_file):
    return read_rows(default_file[0])


def user_starts(user):
    return np.flatnonzero(np.r_[True, user[1:] != user[:-1]])


def in_last_k(user, values, k=5):
    """Share of rows (after a user's first) whose value equals one of the user's previous k values."""
    hit = np.zeros(len(values), dtype=bool)
    for lag in range(1, k + 1):
        hit[lag:] |= (values[lag:] == values[:-lag]) & (user[lag:] == user[:-lag])
    has_previous = np.r_[False, user[1:] == user[:-1]]
    return hit[has_previous].mean()


def top_category_share(user, category, k=3):
    """Share of the second half of each user's rows in that user's top-k categories of the first half."""
    starts = user_starts(user)
    lengths = np.diff(np.append(starts, len(user)))
    user_index = np.repeat(np.arange(len(starts)), lengths)
    first_half = np.arange(len(user)) - starts[user_index] < lengths[user_index] // 2
    _, category_index = np.unique(category, return_inverse=True)
    key = user_index.astype(np.int64) * (category_index.max() + 1) + category_index
    keys, counts = np.unique(key[first_half], return_counts=True)
    key_user = keys // (category_index.max() + 1)
    order = np.lexsort((-counts, key_user))
    rank = np.arange(len(order)) - np.searchsorted(key_user[order], key_user[order])
    top = keys[order][rank < k]
    return np.isin(key[~first_half], top).mean()


def test_default_sizes_are_the_real_catalog_and_rows_per_user():
    assert synth.resolve_sizes(100_150_807) == synth.SynthSizes(
        rows=100_150_807, users=987_994, items=4_162_024, categories=9_439
    )
    assert synth.resolve_sizes(200_000) == synth.SynthSizes(rows=200_000, users=1973, items=4_162_024, categories=9_439)
    assert synth.resolve_sizes(1) == synth.SynthSizes(rows=1, users=1, items=4_162_024, categories=9_439)


def test_format_row_count_and_order(default_file):
    path, summary = default_file
    lines = path.read_text().splitlines()
    assert len(lines) == 200_000
    assert all(len(line.split(",")) == 5 for line in lines[:1000])
    rows = read_rows(path)
    assert set(np.unique(rows["behavior"])) == set(synth.BEHAVIORS)
    assert rows["ts"].min() >= TAOBAO_START_TS
    assert rows["ts"].max() < TAOBAO_START_TS + 9 * SECONDS_PER_DAY
    user, ts = rows["user"], rows["ts"]
    assert np.all(np.diff(user) >= 0), "rows grouped by user, users ascending"
    same_user = user[1:] == user[:-1]
    assert np.all(np.diff(ts)[same_user] >= 0), "time-ordered within a user"
    assert len(np.unique(user)) == summary["users"] == 1973
    assert rows["item"].min() >= 1 and rows["item"].max() <= summary["items"]
    assert rows["category"].min() >= 1 and rows["category"].max() <= summary["categories"]
    # every item belongs to exactly one category
    pairs = np.unique(np.stack([rows["item"], rows["category"]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    values, counts = np.unique(rows["behavior"], return_counts=True)
    assert summary["behaviors"] == dict(zip(values.tolist(), counts.tolist()))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    paths = [tmp_path / name for name in ("a.csv", "b.csv", "c.csv", "a.csv.gz")]
    for path, seed in zip(paths, (5, 5, 6, 5)):
        synth.generate(str(path), 20_000, seed=seed, progress=False)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    assert gzip.decompress(paths[3].read_bytes()) == paths[0].read_bytes()


def test_static_signal_users_keep_their_categories(default_rows):
    user, category = default_rows["user"], default_rows["category"]
    observed = top_category_share(user, category)
    chance = top_category_share(user, np.random.default_rng(0).permutation(category))
    assert observed > chance + 0.25, (observed, chance)


def test_sequence_signal_next_click_follows_recent_clicks(default_rows):
    user = default_rows["user"]
    within_user_shuffle = np.lexsort((np.random.default_rng(0).random(len(user)), user))
    for column, margin in (("category", 0.1), ("item", 0.1)):
        values = default_rows[column]
        observed, chance = in_last_k(user, values), in_last_k(user, values[within_user_shuffle])
        assert observed > chance + margin, (column, observed, chance)


def test_cli_writes_file_and_reports_sizes(tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "cli.csv.gz"
    argv = ["synth", "--out", str(out), "--rows", "1000", "--seed", "1", "--users", "10", "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 1000 and summary["users"] == 10 and sum(summary["behaviors"].values()) == 1000
    assert len(gzip.decompress(out.read_bytes()).splitlines()) == 1000


def test_cli_rejects_non_positive_rows(tmp_path, capsys):
    out = tmp_path / "never.csv"
    assert cli.main(["synth", "--out", str(out), "--rows", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "mdaf synth: error: rows must be positive, got 0"
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rows=-5), "rows must be positive, got -5"),
        (dict(rows=10, users=11), "users must be between 1 and rows (10), got 11"),
        (dict(rows=10, categories=0), "categories must be positive, got 0"),
        (
            dict(rows=10, items=2, categories=3),
            "items (2) must be at least categories (3): every category needs an item",
        ),
        (dict(rows=10, seed=-1), "seed must be non-negative, got -1"),
    ],
)
def test_bad_sizes_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError) as raised:
        synth.generate(str(tmp_path / "bad.csv"), progress=False, **kwargs)
    assert str(raised.value) == message


# the real data set's statistics (issue 19; mdaf_dist.data.stats defines each) and how close a
# seeded 200K-row synthetic file must come: samples of 1K-2.4K rows are 10-25 users, hence wider
CALIBRATION = {
    "categories_1000": (190, 0.3 * 190),
    "categories_2400": (420, 0.3 * 420),
    "categories_5000": (710, 0.2 * 710),
    "categories_10000": (1100, 0.2 * 1100),
    **{f"items_per_row_{n}": (0.76, 0.04) for n in (1000, 2400, 5000, 10_000)},
    "top1pct_click_share": (0.055, 0.01),
    "zipf_exponent": (0.3, 0.1),
    "rows_per_user": (85, 5),
    "active_days_per_user": (6.6, 0.4),
    "categories_per_user": (23, 4),
    "category_in_last_1": (0.40, 0.03),
    "category_in_last_10": (0.62, 0.03),
    "category_in_last_50": (0.70, 0.03),
    "repeat_rate": (0.19, 0.03),
    "after_view": (0.20, 0.03),
    "share_pv": (0.895, 0.003),
    "share_cart": (0.055, 0.003),
    "share_fav": (0.029, 0.003),
    "share_buy": (0.020, 0.003),
}


def test_statistics_match_the_real_data_set(default_file):
    measured = stats.compute(stats.read_events(str(default_file[0]))[0])
    assert (measured["first_day"], measured["last_day"]) == ("2017-11-25", "2017-12-03")
    misses = {
        key: (round(measured[key], 3), target, tolerance)
        for key, (target, tolerance) in CALIBRATION.items()
        if abs(measured[key] - target) > tolerance
    }
    assert not misses, misses


def test_prepare_on_a_sample_sees_new_items_and_filters_like_real_data(tmp_path):
    """10K rows (about 100 users): validation items are mostly new, and with negatives of history
    categories the category filter drops a third of positives, so the positive share falls."""
    raw = tmp_path / "raw.csv"
    synth.generate(str(raw), 10_000, seed=11, progress=False)
    cfg = PrepareConfig(input=str(raw), out=str(tmp_path / "data"), neg_category="filter", category_filter="last_l")
    meta = prepare(cfg, progress=False)
    train, valid = (pq.read_table(tmp_path / "data" / "samples" / split) for split in ("train", "valid"))
    valid_items = np.unique(valid["item"].to_numpy()[valid["label"].to_numpy() == 1])
    unseen = np.mean(~np.isin(valid_items, train["item"].to_numpy()))
    assert unseen >= 0.75, unseen
    stages = {row["stage"]: row for row in meta["stages"]}
    before, after = stages["- empty history (click)"], stages["- category filter (last_l)"]
    positives = [sum(row[f"{split}_positives"] for split in ("train", "valid")) for row in (before, after)]
    dropped = 1 - positives[1] / positives[0]
    assert 0.25 <= dropped <= 0.40, dropped
    assert positives[1] / after["rows"] < positives[0] / before["rows"] - 0.03, "the positive share falls"
