"""Samples: histories, negatives, filters, split and subsampling against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from mdaf_dist.config import SECONDS_PER_DAY
from mdaf_dist.data import samples as S
from mdaf_dist.data.vocab import PADDING_RAW_ID, dense_ids, dense_of
from mdaf_dist.errors import UserError

START = 1_000_000_000


def clicks_from_raw(user, item, category, ts) -> S.Clicks:
    """The pipeline's click construction on raw columns in file order."""
    user, item, category, ts = (np.asarray(a, dtype=np.int64) for a in (user, item, category, ts))
    order = S.click_order(user, ts)
    dense_user, users = dense_ids(user[order])
    dense_item, _ = dense_ids(item[order])
    dense_category, _ = dense_ids(category[order])
    return S.make_clicks(dense_user, dense_item, dense_category, ts[order].astype(np.int32), len(users))


def random_clicks(seed: int, n: int = 3000, users: int = 40, items: int = 300, categories: int = 12, days: int = 3):
    rng = np.random.default_rng(seed)
    item = rng.integers(1, items, n)
    return clicks_from_raw(
        rng.integers(1, users, n), item, item % categories, START + rng.integers(0, days * SECONDS_PER_DAY, n)
    )


def window_pool(clicks: S.Clicks, sampling: str, window_start: int = START) -> S.NegativePool:
    """The pool of the clicks' own days, as `mdaf prepare`'s scan builds it over every click."""
    window = (clicks.ts.astype(np.int64) - window_start) // SECONDS_PER_DAY
    first = int(window.min())
    num_categories, num_items = int(clicks.category.max()) + 1, int(clicks.item.max()) + 1
    keys, counts = S.count_sorted(S.pack_pool_keys(window - first, clicks.category, clicks.item, num_categories, num_items))
    return S.NegativePool.of(keys, counts, sampling, first, int(window.max()) - first + 1, num_categories, num_items)


def draw(clicks: S.Clicks, counts, seed: int, sampling: str = "uniform", max_draws: int = 10, category_span=None, window_start: int = START) -> S.NegativeDraw:
    """Negatives of `clicks`; `counts` a ratio or the count per click."""
    click_hash = S.click_hashes(clicks, seed)
    counts = S.negative_counts(click_hash, counts) if isinstance(counts, float) else np.asarray(counts)
    return S.draw_negatives(clicks, counts, window_pool(clicks, sampling, window_start), click_hash, window_start=window_start, window_seconds=SECONDS_PER_DAY,
                            max_draws=max_draws, category_span=category_span)


def test_histories_are_the_clicks_strictly_before_with_ties_in_file_order():
    # equal timestamps everywhere, users interleaved, file order unsorted in time
    user = [7, 3, 7, 7, 3, 7, 3, 7]
    item = [10, 20, 11, 12, 21, 13, 22, 14]
    ts = [50, 40, 50, 40, 40, 60, 30, 50]
    clicks = clicks_from_raw(user, item, [1] * 8, ts)
    _, raw_item = dense_ids(np.array(item))
    _, raw_user = dense_ids(np.array(user))
    for i in range(len(user)):
        # reference: the same user's rows earlier in time, or at the same time earlier in the file
        earlier = sorted((ts[j], j) for j in range(len(user)) if user[j] == user[i] and (ts[j], j) < (ts[i], i))
        expected = [item[j] for _, j in earlier]
        target = [k for k in range(len(user)) if raw_user[clicks.user[k]] == user[i] and raw_item[clicks.item[k]] == item[i]]
        (k,) = target
        off, pos = clicks.user_offsets[clicks.user[k]], clicks.pos[k]
        assert raw_item[clicks.item[off : off + pos]].tolist() == expected


def test_user_offsets_cover_users_with_padding_user_empty():
    clicks = clicks_from_raw([5, 9, 5], [1, 2, 3], [1, 1, 1], [3, 2, 1])
    assert clicks.user_offsets.tolist() == [0, 0, 2, 3]
    assert clicks.pos.tolist() == [0, 1, 0]
    assert clicks.ts.tolist() == [1, 3, 2]


def test_dense_ids_follow_raw_order_on_both_paths():
    small = np.array([30, 10, 30, 20])
    large = small * (1 << 40)
    for raw in (small, large):
        dense, raw_by_dense = dense_ids(raw)
        assert dense.tolist() == [3, 1, 3, 2]
        assert raw_by_dense.tolist() == [PADDING_RAW_ID, *sorted(set(raw.tolist()))]
        # the same ids looked up in the saved vocabulary, as a partition of the users does
        assert dense_of(raw_by_dense, raw[::-1]).tolist() == dense[::-1].tolist()


@pytest.mark.parametrize("sampling", S.NEG_SAMPLING)
def test_negatives_avoid_the_users_window_clicks_and_come_from_the_window(sampling):
    clicks = random_clicks(seed=1)
    counts = S.negative_counts(S.click_hashes(clicks, 3), 1.5)
    negatives = draw(clicks, counts, seed=3, sampling=sampling)
    day = (clicks.ts.astype(np.int64) - START) // SECONDS_PER_DAY
    window_items = {d: set(clicks.item[day == d].tolist()) for d in np.unique(day).tolist()}
    user_window_items = set(zip(clicks.user.tolist(), day.tolist(), clicks.item.tolist()))
    assert negatives.requested == counts.sum() and len(negatives.owner) == negatives.requested - negatives.unavailable
    for owner, item in zip(negatives.owner.tolist(), negatives.item.tolist()):
        u, d = int(clicks.user[owner]), int(day[owner])
        assert item in window_items[d]
        assert (u, d, item) not in user_window_items


def test_negatives_share_the_positive_user_pos_ts_and_take_the_item_category():
    clicks = random_clicks(seed=2)
    negatives = draw(clicks, 2.0, seed=0)
    samples = S.with_negatives(clicks, negatives)
    assert len(samples) == len(clicks.user) + len(negatives.owner)
    item_category = dict(zip(clicks.item.tolist(), clicks.category.tolist()))  # one category per item here
    positive = np.flatnonzero(samples.label == 1)
    assert positive.tolist() == (np.arange(len(clicks.user)) + np.concatenate([[0], np.cumsum(np.bincount(negatives.owner, minlength=len(clicks.user)))[:-1]])).tolist()
    # each negative follows its positive: same user, pos, ts as the last positive before it
    last_positive = np.maximum.accumulate(np.where(samples.label == 1, np.arange(len(samples)), 0))
    for name in ("user", "pos", "ts"):
        column = getattr(samples, name)
        assert np.array_equal(column, column[last_positive])
    negative = samples.label == 0
    assert all(item_category[i] == c for i, c in zip(samples.item[negative].tolist(), samples.category[negative].tolist()))


def test_negative_ratio_gives_the_positive_share():
    click_hash = S.splitmix64(np.arange(200_000, dtype=np.uint64))
    counts = S.negative_counts(click_hash, 1.5)
    assert set(np.unique(counts).tolist()) == {1, 2}
    assert 1 / (1 + counts.mean()) == pytest.approx(0.4, abs=0.002)
    assert (S.negative_counts(click_hash[:10], 2.0) == 2).all()


def test_popularity_draws_index_the_clicks_in_key_order():
    # the reference: every click's key, sorted, indexed by the draw
    keys = np.array([3, 9, 3, 5, 9, 9, 12], dtype=np.int64)
    distinct, counts = S.count_sorted(keys)
    assert (distinct.tolist(), counts.tolist()) == ([3, 5, 9, 12], [2, 1, 3, 1])
    pool = S.NegativePool.of(distinct, counts, "popularity", 0, 1, 1, 13)
    every_draw = np.arange(len(keys))
    assert pool.key_at(every_draw).tolist() == np.sort(keys).tolist()
    assert S.NegativePool.of(distinct, None, "uniform", 0, 1, 1, 13).key_at(np.arange(4)).tolist() == [3, 5, 9, 12]


def test_a_users_negatives_do_not_depend_on_the_other_users():
    clicks = random_clicks(seed=6)
    whole = draw(clicks, 1.5, seed=6)
    # user 3 alone, with the same pool (the pool is every user's clicks)
    mine = slice(clicks.user_offsets[3], clicks.user_offsets[4])
    alone = S.Clicks(clicks.user[mine], clicks.item[mine], clicks.category[mine], clicks.ts[mine], clicks.user_offsets - clicks.user_offsets[3])
    click_hash = S.click_hashes(alone, 6)
    negatives = S.draw_negatives(alone, S.negative_counts(click_hash, 1.5), window_pool(clicks, "uniform"), click_hash,
                                 window_start=START, window_seconds=SECONDS_PER_DAY, max_draws=10)
    in_whole = (whole.owner >= mine.start) & (whole.owner < mine.stop)
    assert in_whole.sum() > 20
    assert np.array_equal(whole.owner[in_whole] - mine.start, negatives.owner) and np.array_equal(whole.item[in_whole], negatives.item)


def test_negatives_are_dropped_and_counted_when_the_user_clicked_every_window_item():
    # user 1 clicked both items of day 0; user 2 clicked one of them
    clicks = clicks_from_raw([1, 1, 2], [5, 6, 5], [1, 1, 1], [START, START + 1, START + 2])
    negatives = draw(clicks, [1, 1, 1], seed=0, max_draws=5)
    assert (negatives.requested, negatives.unavailable) == (3, 2)
    assert negatives.owner.tolist() == [2] and negatives.item.tolist() == [2]  # dense id of raw item 6


def test_negative_draws_are_reproducible():
    clicks = random_clicks(seed=4)
    a, b = draw(clicks, 1.5, seed=9, sampling="popularity"), draw(clicks, 1.5, seed=9, sampling="popularity")
    assert np.array_equal(a.item, b.item) and np.array_equal(a.owner, b.owner)


def reference_keep(clicks: S.Clicks, samples: S.Samples, mode: str, history_length: int, last_k: int):
    keep = []
    for u, c, p in zip(samples.user.tolist(), samples.category.tolist(), samples.pos.tolist()):
        off = clicks.user_offsets[u]
        history = clicks.category[off : off + p].tolist()
        window = {"last_l": history[-history_length:], "last_k": history[-last_k:], "any": history, "none": None}[mode]
        keep.append(True if window is None else c in window)
    return np.array(keep)


@pytest.mark.parametrize("mode", S.CATEGORY_FILTERS)
def test_category_filter_matches_brute_force(mode):
    clicks = random_clicks(seed=5, n=2500, users=15, categories=40)
    samples = S.with_negatives(clicks, draw(clicks, 1.5, seed=5))
    got = S.category_filter(S.CategoryHistory(clicks), samples, mode, history_length=20, last_k=4)
    expected = reference_keep(clicks, samples, mode, history_length=20, last_k=4)
    assert np.array_equal(got, expected)
    assert 0 < got.sum() < len(samples) or mode == "none"


def test_samples_built_by_click_ranges_equal_the_whole():
    clicks = random_clicks(seed=8, n=500)
    negatives = draw(clicks, 1.5, seed=8)
    whole = S.with_negatives(clicks, negatives)
    parts = [S.with_negatives(clicks, negatives, start, min(start + 77, 500)) for start in range(0, 500, 77)]
    for name in ("user", "pos", "item", "category", "label", "ts"):
        assert np.array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))


def reference_filter_span_categories(clicks: S.Clicks, span: int) -> dict:
    """Click index -> categories of the last `span` clicks of its user before it, walking the clicks."""
    seen: dict = {}
    categories = {}
    for i, (user, category) in enumerate(zip(clicks.user.tolist(), clicks.category.tolist())):
        history = seen.setdefault(user, [])
        categories[i] = set(history[-span:])
        history.append(category)
    return categories


@pytest.mark.parametrize("sampling", S.NEG_SAMPLING)
@pytest.mark.parametrize("mode", ["last_l", "last_k", "any"])
def test_filter_consistent_negatives_match_brute_force(sampling, mode):
    clicks = random_clicks(seed=10, n=1500, users=12, items=400, categories=30)
    span = S.filter_span(mode, history_length=20, last_k=3)
    counts = S.negative_counts(S.click_hashes(clicks, 10), 1.5)
    negatives = draw(clicks, counts, seed=10, sampling=sampling, category_span=span)
    day = (clicks.ts.astype(np.int64) - START) // SECONDS_PER_DAY
    window_pairs = set(zip(day.tolist(), clicks.item.tolist(), clicks.category.tolist()))
    user_window_items = set(zip(clicks.user.tolist(), day.tolist(), clicks.item.tolist()))
    span_categories = reference_filter_span_categories(clicks, span)
    assert negatives.requested == counts.sum() and len(negatives.owner) == negatives.requested - negatives.unavailable
    assert negatives.unavailable < 0.05 * negatives.requested
    for owner, item, category in zip(negatives.owner.tolist(), negatives.item.tolist(), negatives.category.tolist()):
        u, d = int(clicks.user[owner]), int(day[owner])
        assert (d, item, category) in window_pairs  # an item clicked under that category in the window
        assert (u, d, item) not in user_window_items
        if span_categories[owner]:
            assert category in span_categories[owner]
    # hence every negative with a history passes the filter, as the paper's negatives do
    samples = S.with_negatives(clicks, negatives)
    negative = (samples.label == 0) & (samples.pos > 0)
    assert S.category_filter(S.CategoryHistory(clicks), samples, mode, history_length=20, last_k=3)[negative].all()


@pytest.mark.parametrize("sampling", S.NEG_SAMPLING)
def test_the_pools_group_table_and_search_draw_the_same_negatives(sampling, monkeypatch):
    # 200 categories over 3 days and 1500 clicks: many (window, category) groups have no item
    clicks = random_clicks(seed=11, n=1500, users=12, items=400, categories=200)
    counts = S.negative_counts(S.click_hashes(clicks, 11), 2.0)
    assert window_pool(clicks, sampling).groups is None
    table = draw(clicks, counts, seed=11, sampling=sampling, category_span=20)
    monkeypatch.setattr(S, "DENSE_GROUPS", -(1 << 40))
    assert window_pool(clicks, sampling).groups is not None
    search = draw(clicks, counts, seed=11, sampling=sampling, category_span=20)
    assert table.unavailable > 0 and (table.owner.tolist(), table.item.tolist(), table.category.tolist(), table.unavailable) == (
        search.owner.tolist(), search.item.tolist(), search.category.tolist(), search.unavailable)


def test_filter_consistent_negatives_fall_back_to_the_window_without_history():
    # user 1's first click has no history; its negative can only be user 2's item of day 0
    clicks = clicks_from_raw([1, 2, 1], [5, 6, 7], [1, 2, 3], [START, START + 1, START + 2])
    negatives = draw(clicks, [1, 0, 0], seed=0, max_draws=5, category_span=50)
    assert negatives.owner.tolist() == [0] and (negatives.item.tolist(), negatives.category.tolist()) == ([2], [2])


def test_filter_consistent_negatives_drawn_from_the_history_category_only():
    # user 1's history is category 1 only; day 0 offers items of categories 1 and 2: the
    # negative must be item 8, the one category-1 item user 1 did not click
    clicks = clicks_from_raw(
        [1, 1, 2, 2, 2], [5, 6, 7, 8, 9], [1, 1, 2, 1, 2], [START, START + 9, START + 1, START + 2, START + 3]
    )
    second_click_of_user_1 = 1
    counts = np.zeros(len(clicks.user), dtype=np.int64)
    counts[second_click_of_user_1] = 20
    negatives = draw(clicks, counts, seed=0, max_draws=60, category_span=50)
    assert set(negatives.item.tolist()) == {4} and set(negatives.category.tolist()) == {1}  # dense ids of raw item 8, category 1
    assert negatives.unavailable == 0
    # history category absent from the window: every draw fails, and the negatives are counted
    clicks = clicks_from_raw([1, 1, 2], [5, 6, 7], [1, 2, 2], [START - SECONDS_PER_DAY, START, START + 1])
    negatives = draw(clicks, [0, 3, 0], seed=0, max_draws=4, category_span=1, window_start=START - SECONDS_PER_DAY)
    assert (negatives.requested, negatives.unavailable, len(negatives.owner)) == (3, 3, 0)


def test_category_gap_counts_back_from_the_target():
    clicks = clicks_from_raw([1] * 5, [1, 2, 3, 4, 5], [7, 8, 8, 9, 7], [1, 2, 3, 4, 5])
    samples = S.positives(clicks)
    assert S.CategoryHistory(clicks).gap(samples).tolist() == [S.NO_PREVIOUS, S.NO_PREVIOUS, 1, S.NO_PREVIOUS, 4]


def test_empty_history_mask():
    clicks = clicks_from_raw([1, 2, 1], [1, 2, 3], [1, 1, 1], [1, 1, 2])
    assert S.has_history(S.positives(clicks)).tolist() == [False, True, False]


def test_temporal_split_by_days_puts_valid_then_test_last():
    valid_start, test_start = S.split_bounds_by_days(START, window_days=9, valid_days=2, test_days=1)
    assert (valid_start, test_start) == (START + 6 * SECONDS_PER_DAY, START + 8 * SECONDS_PER_DAY)
    ts = np.array([START, valid_start - 1, valid_start, test_start - 1, test_start, START + 9 * SECONDS_PER_DAY - 1])
    assert [S.SPLITS[c] for c in S.assign_split(ts, valid_start, test_start)] == ["train", "train", "valid", "valid", "test", "test"]
    # the paper's protocol: the last day is validation, no test day
    assert S.split_bounds_by_days(START, 9, 1, 0) == (START + 8 * SECONDS_PER_DAY, START + 9 * SECONDS_PER_DAY)
    with pytest.raises(UserError, match=r"prepare.valid_days must be >= 1, prepare.test_days >= 0 and together below window_days \(9\), got 8 and 1"):
        S.split_bounds_by_days(START, window_days=9, valid_days=8, test_days=1)


def test_temporal_split_by_fraction_cuts_the_time_range():
    # 100 seconds [1000, 1099]: the last 10 are test, the 20 before validation
    assert S.split_bounds_by_fraction(1000, 1099, 0.2, 0.1) == (1070, 1090)
    labels = np.array([1, 0, 1, 1, 0], dtype=np.int8)
    codes = S.assign_split(np.array([1000, 1069, 1070, 1089, 1090]), 1070, 1090)
    assert S.split_counts(labels, codes).tolist() == [2, 2, 1, 1, 2, 0]
    with pytest.raises(UserError, match=r"prepare.valid_fraction must be > 0, prepare.test_fraction >= 0 and together below 1, got 0.5 and 0.5"):
        S.split_bounds_by_fraction(0, 99, 0.5, 0.5)


def test_user_subsampling_is_deterministic_proportional_and_nested():
    users = np.arange(1, 200_001, dtype=np.int64)
    keep = S.keep_users(users, 0.1, seed=42)
    assert keep.mean() == pytest.approx(0.1, abs=0.003)
    assert np.array_equal(keep, S.keep_users(users, 0.1, seed=42))
    # a user's fate does not depend on the other rows, and smaller fractions are subsets
    assert np.array_equal(S.keep_users(users[::-7], 0.1, seed=42), keep[::-7])
    assert not (S.keep_users(users, 0.05, seed=42) & ~keep).any()
    assert (keep != S.keep_users(users, 0.1, seed=43)).any()
    with pytest.raises(UserError, match=r"prepare.user_fraction must be in \(0, 1\], got 0"):
        S.keep_users(users, 0.0, seed=42)


def test_unknown_filter_and_sampling_are_user_errors():
    clicks = random_clicks(seed=6, n=10)
    with pytest.raises(UserError, match="prepare.category_filter must be one of"):
        S.category_filter(S.CategoryHistory(clicks), S.positives(clicks), "last", 50, 10)
    with pytest.raises(UserError, match="prepare.neg_sampling must be one of"):
        window_pool(clicks, "zipf")


def reference_history_ends(clicks: S.Clicks, cutoff: str, gap: int) -> list:
    """Walk back from each click while the previous click of its user is in the same block."""
    ends = []
    for i in range(len(clicks.user)):
        first, j = int(clicks.user_offsets[clicks.user[i]]), i
        day = (int(clicks.ts[i]) - START) // SECONDS_PER_DAY
        while j > first and (
            (cutoff == "window" and (int(clicks.ts[j - 1]) - START) // SECONDS_PER_DAY == day)
            or (cutoff == "session" and int(clicks.ts[j]) - int(clicks.ts[j - 1]) <= gap)
        ):
            j -= 1
        ends.append(j - first)
    return ends


@pytest.mark.parametrize("cutoff", ["window", "session"])
def test_history_cutoffs_match_brute_force(cutoff):
    clicks = random_clicks(seed=12, n=800, users=15, days=4)
    ends = S.history_ends(clicks, cutoff, window_start=START, window_seconds=SECONDS_PER_DAY, session_gap_seconds=3 * 3600)
    assert ends.tolist() == reference_history_ends(clicks, cutoff, 3 * 3600)
    assert 0 < (ends == 0).sum() < len(ends) and (ends <= clicks.pos).all()
    assert S.history_ends(clicks, "click", window_start=START, window_seconds=SECONDS_PER_DAY, session_gap_seconds=1) is None
    clicks.history_end = ends
    assert S.positives(clicks).pos.tolist() == ends.tolist()


@pytest.mark.parametrize("cutoff", ["window", "session"])
def test_filter_consistent_negatives_follow_the_history_cutoff(cutoff):
    clicks = random_clicks(seed=13, n=1500, users=12, items=400, categories=30)
    clicks.history_end = S.history_ends(clicks, cutoff, window_start=START, window_seconds=SECONDS_PER_DAY, session_gap_seconds=3600)
    negatives = draw(clicks, 1.5, seed=13, category_span=5)
    samples = S.with_negatives(clicks, negatives)
    negative = (samples.label == 0) & (samples.pos > 0)
    assert negative.sum() > 100
    # drawn from the last 5 clicks of the cut history, so they pass the filter that looks there
    assert S.category_filter(S.CategoryHistory(clicks), samples, "last_k", history_length=20, last_k=5)[negative].all()


def test_repeated_clicks_match_brute_force():
    user = np.array([1, 1, 1, 1, 2, 2, 2, 3])
    item = np.array([5, 5, 6, 5, 5, 7, 7, 5])
    assert S.repeated_clicks(user, item, "none").tolist() == [False] * 8
    assert S.repeated_clicks(user, item, "consecutive").tolist() == [False, True, False, False, False, False, True, False]
    assert S.repeated_clicks(user, item, "user_item").tolist() == [False, True, False, True, False, False, True, False]
    with pytest.raises(UserError, match=r"prepare.dedup_clicks must be one of \('none', 'consecutive', 'user_item'\), got 'all'"):
        S.repeated_clicks(user, item, "all")
