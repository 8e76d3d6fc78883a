"""The synthetic UserBehavior generator: format, determinism, marginals and the planted signals."""

import gzip
import json

import numpy as np
import pyarrow.csv as pacsv
import pytest

from mdaf_dist import cli
from mdaf_dist.config import SECONDS_PER_DAY, TAOBAO_START_TS
from mdaf_dist.data import synth
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
def rich_rows(tmp_path_factory):
    """200K rows with 400 categories, so that 'chance' is low enough to see the signals clearly."""
    path = tmp_path_factory.mktemp("synth") / "rich.csv"
    synth.generate(str(path), 200_000, seed=3, categories=400, progress=False)
    return read_rows(path)


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


def test_default_sizes_follow_the_real_ratios():
    assert synth.resolve_sizes(100_150_807) == synth.SynthSizes(
        rows=100_150_807, users=987_994, items=4_162_024, categories=9_439
    )
    assert synth.resolve_sizes(200_000) == synth.SynthSizes(rows=200_000, users=1973, items=8312, categories=19)
    assert synth.resolve_sizes(1) == synth.SynthSizes(rows=1, users=1, items=1, categories=1)


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


def test_behavior_mix(default_file):
    _, summary = default_file
    shares = np.array([summary["behaviors"][b] for b in synth.BEHAVIORS]) / summary["rows"]
    np.testing.assert_allclose(shares, [0.895, 0.055, 0.029, 0.021], atol=0.003)


def test_item_popularity_is_heavy_tailed(default_file):
    rows = read_rows(default_file[0])
    clicks = np.sort(np.unique(rows["item"], return_counts=True)[1])[::-1]
    top_share = clicks[: len(clicks) // 100].sum() / clicks.sum()
    assert top_share > 0.15, f"top 1% of items take {top_share:.3f} of clicks (uniform: about 0.01)"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    paths = [tmp_path / name for name in ("a.csv", "b.csv", "c.csv", "a.csv.gz")]
    for path, seed in zip(paths, (5, 5, 6, 5)):
        synth.generate(str(path), 20_000, seed=seed, progress=False)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    assert gzip.decompress(paths[3].read_bytes()) == paths[0].read_bytes()


def test_static_signal_users_keep_their_categories(rich_rows):
    user, category = rich_rows["user"], rich_rows["category"]
    observed = top_category_share(user, category)
    chance = top_category_share(user, np.random.default_rng(0).permutation(category))
    assert observed > chance + 0.25, (observed, chance)


def test_sequence_signal_next_click_follows_recent_clicks(rich_rows):
    user = rich_rows["user"]
    within_user_shuffle = np.lexsort((np.random.default_rng(0).random(len(user)), user))
    for column, margin in (("category", 0.1), ("item", 0.1)):
        values = rich_rows[column]
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
