"""CTR samples from click histories: positives, negatives, filters, temporal split.

Everything is vectorised numpy over whole columns (sorts, `searchsorted`, `bincount`), so the
full 100M-row data set goes through in minutes; no Python loop runs over rows or users.

A sample is (user, pos, item, category, label, ts): its history is the user's clicks before
local position `pos` (see `mdaf_dist.data.layout`), so histories are never materialised. `pos` is
the click's own position, or with a coarser `history_cutoff` that of the first click of its time
window or session, so that a history never holds clicks of the sample's own day or session.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple, get_args

import numpy as np

from mdaf_dist.config import SECONDS_PER_DAY, CategoryFilter, DedupClicks, HistoryCutoff, NegCategory, NegSampling
from mdaf_dist.data.layout import SPLITS
from mdaf_dist.errors import UserError

CATEGORY_FILTERS = get_args(CategoryFilter)
NEG_SAMPLING = get_args(NegSampling)
# `CategoryHistory.gap` of a sample whose category is not among the user's earlier clicks
NO_PREVIOUS = np.iinfo(np.int32).max
# `filter_span` of the "any" filter: every earlier click
WHOLE_HISTORY = NO_PREVIOUS - 1
# negatives' categories: from the history span the category filter looks at, or any (`draw_negatives`)
NEG_CATEGORIES = get_args(NegCategory)
# where a sample's history ends (`history_ends`)
HISTORY_CUTOFFS = get_args(HistoryCutoff)
# which repeated clicks are dropped (`repeated_clicks`)
DEDUP_CLICKS = get_args(DedupClicks)
# rows per slice in the passes that build large int64 temporaries
CHUNK = 1 << 23
# `NegativePool` looks up every (window, category) in a table when there are at most this many
# more of them than distinct (window, category, item) keys, else searches the ones present
DENSE_GROUPS = 1 << 22


@dataclass
class Clicks:
    """Clicks (pv events) sorted by (user, ts, original file order), with dense ids.

    `user_offsets[u]:user_offsets[u + 1]` are user u's clicks; user 0 is padding and empty.
    """

    user: np.ndarray  # int32, non-decreasing
    item: np.ndarray  # int32
    category: np.ndarray  # int32
    ts: np.ndarray  # int32
    user_offsets: np.ndarray  # int64 [num_users + 1]
    # int32 per click: the length of its history, where that is not `pos` (`history_ends`)
    history_end: Optional[np.ndarray] = None

    @property
    def pos(self) -> np.ndarray:
        """Index of each click within its user's clicks."""
        return self.positions(0, len(self.user))

    def positions(self, start: int, stop: int) -> np.ndarray:
        """`pos` of clicks [start, stop) only."""
        return (np.arange(start, stop, dtype=np.int64) - self.user_offsets[self.user[start:stop]]).astype(np.int32)

    def history_lengths(self, start: int, stop: int) -> np.ndarray:
        """History length of clicks [start, stop): the clicks before it, or before its cutoff."""
        return self.positions(start, stop) if self.history_end is None else self.history_end[start:stop]


@dataclass
class Samples:
    """Columns of CTR samples, in the order of `mdaf_dist.data.layout.SAMPLE_SCHEMA`."""

    user: np.ndarray  # int32
    pos: np.ndarray  # int32
    item: np.ndarray  # int32
    category: np.ndarray  # int32
    label: np.ndarray  # int8
    ts: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> "Samples":
        return Samples(*(getattr(self, f.name)[mask] for f in fields(self)))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (Steele et al., SplitMix64 finaliser); wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seed_hash(seed: int) -> np.uint64:
    return splitmix64(np.array([seed], dtype=np.uint64))[0]


def _uniform(h: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from the top 53 bits of 64-bit hashes."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_users(raw_user: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of events whose user is kept by seeded subsampling.

    The decision hashes (raw user id, seed) only, so a user is kept or not regardless of which
    other rows are in the file, and a smaller fraction keeps a subset of a larger one.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"prepare.user_fraction must be in (0, 1], got {fraction}")
    with np.errstate(over="ignore"):
        h = splitmix64(raw_user.astype(np.uint64) + _seed_hash(seed))
    return _uniform(h) < fraction


def click_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Indices sorting events by (user, ts), ties kept in file order.

    `user` must be small non-negative ids (dense ones) and `ts` int32-range: both are packed into
    one int64 key for a stable argsort, which on the file's user-grouped, mostly time-ordered
    rows is several times faster than `np.lexsort` over the two columns.
    """
    ts64 = ts.astype(np.int64)
    ts64 -= ts64.min(initial=0)
    if int(ts64.max(initial=0)) >> 32 or int(user.max(initial=0)) >> 31:
        raise UserError("timestamps span more than 2**32 seconds or user ids exceed 2**31")
    ts64 |= user.astype(np.int64) << 32
    return np.argsort(ts64, kind="stable")


def make_clicks(user: np.ndarray, item: np.ndarray, category: np.ndarray, ts: np.ndarray, num_users: int) -> Clicks:
    """Clicks from columns already in click order; `user` dense in 1..num_users - 1."""
    counts = np.bincount(user, minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Clicks(user=user, item=item, category=category, ts=ts, user_offsets=offsets)


def repeated_clicks(user: np.ndarray, item: np.ndarray, mode: str) -> np.ndarray:
    """Mask of the clicks `prepare.dedup_clicks` drops, over clicks in click order: "consecutive":
    a click of the item its user clicked just before (a reload); "user_item": every click of an
    item after the user's first; "none": keeps all."""
    if mode not in DEDUP_CLICKS:
        raise UserError(f"prepare.dedup_clicks must be one of {DEDUP_CLICKS}, got {mode!r}")
    repeated = np.zeros(len(user), dtype=bool)
    if mode == "consecutive":
        repeated[1:] = (user[1:] == user[:-1]) & (item[1:] == item[:-1])
    elif mode == "user_item":
        _check_key_space("(user, item)", int(user.max(initial=0)) + 1, int(item.max(initial=0)) + 1)
        keys = user.astype(np.int64) * (int(item.max(initial=0)) + 1) + item
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        repeated[order[1:][ordered[1:] == ordered[:-1]]] = True
    return repeated


def history_ends(clicks: Clicks, cutoff: str, *, window_start: int, window_seconds: int, session_gap_seconds: int) -> Optional[np.ndarray]:
    """Per click, how many of its user's clicks its history holds (None for "click": all before it).

    "window": the clicks before the click's time window (`(ts - window_start) // window_seconds`,
    the negatives' window, one day by default), so a history holds earlier days only; "session":
    the clicks before its session, a session ending where the user pauses for more than
    `session_gap_seconds`. Either way the history ends at the first click of the click's block.
    """
    if cutoff not in HISTORY_CUTOFFS:
        raise UserError(f"prepare.history_cutoff must be one of {HISTORY_CUTOFFS}, got {cutoff!r}")
    if cutoff == "click":
        return None
    n = len(clicks.user)
    block_start = np.ones(n, dtype=bool)
    if cutoff == "window":
        if window_seconds <= 0:
            raise UserError(f"prepare.neg_window_seconds must be positive, got {window_seconds}")
        window = (clicks.ts.astype(np.int64) - window_start) // window_seconds
        np.not_equal(window[1:], window[:-1], out=block_start[1:])
        del window
    else:
        if session_gap_seconds <= 0:
            raise UserError(f"prepare.session_gap_seconds must be positive, got {session_gap_seconds}")
        np.greater(np.diff(clicks.ts.astype(np.int64)), session_gap_seconds, out=block_start[1:])
    block_start[1:] |= clicks.user[1:] != clicks.user[:-1]
    # index of each click's block start, in place: 100M clicks take one int64 array at a time
    first = np.arange(n, dtype=np.int64)
    first[~block_start] = 0
    np.maximum.accumulate(first, out=first)
    first -= clicks.user_offsets[clicks.user]
    return first.astype(np.int32)


def positives(clicks: Clicks) -> Samples:
    """Every click is a positive whose history is the user's clicks before it (or its cutoff)."""
    return Samples(
        user=clicks.user,
        pos=clicks.history_lengths(0, len(clicks.user)),
        item=clicks.item,
        category=clicks.category,
        label=np.ones(len(clicks.user), dtype=np.int8),
        ts=clicks.ts,
    )


def _contains(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Membership of `queries` in `sorted_keys`.

    Callers pass queries in user order (keys lead with the user): consecutive binary searches
    then end in the same cached region of `sorted_keys`, several times faster than scattered
    queries and than sorting the queries first (an argsort costs more than the searches).
    """
    if not len(sorted_keys):
        return np.zeros(len(queries), dtype=bool)
    index = np.searchsorted(sorted_keys, queries)
    np.minimum(index, len(sorted_keys) - 1, out=index)
    return sorted_keys[index] == queries


def _chunks(n: int) -> range:
    """Starts of CHUNK-row slices: per-row temporaries stay bounded on 100M+ rows."""
    return range(0, n, CHUNK)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values: `np.unique` hashes in numpy 2.x, which is several times slower
    than a sort on 100M int64 keys."""
    ordered = np.sort(values)
    return ordered[run_starts(ordered)]


def run_starts(ordered: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values in a sorted array."""
    distinct = np.ones(len(ordered), dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=distinct[1:])
    return np.flatnonzero(distinct)


def _check_key_space(what: str, *radices: int) -> None:
    """Composite int64 keys must not overflow; Python ints make the check exact."""
    size = 1
    for r in radices:
        size *= max(int(r), 1)
    if size >= 1 << 63:
        raise UserError(f"too many distinct values to pack {what} into 64-bit keys ({size})")


def filter_span(mode: str, history_length: int, last_k: int) -> Optional[int]:
    """How many of the last history clicks `category_filter(mode)` looks at; None: no filter."""
    if mode not in CATEGORY_FILTERS:
        raise UserError(f"prepare.category_filter must be one of {CATEGORY_FILTERS}, got {mode!r}")
    return {"last_l": history_length, "last_k": last_k, "any": WHOLE_HISTORY, "none": None}[mode]


def click_hashes(clicks: Clicks, seed: int) -> np.ndarray:
    """A 64-bit hash of (seed, user, position in the user's clicks) per click: the source of every
    random number of its negatives (`negative_counts`, `draw_negatives`). It names the click, not
    its place in an array, so a user's negatives are the same whichever other users are processed
    with it (`mdaf_dist.data.partitions`)."""
    with np.errstate(over="ignore"):
        return splitmix64((clicks.user.astype(np.uint64) << np.uint64(32)) + clicks.pos.astype(np.uint64) + _seed_hash(seed))


def negative_counts(click_hash: np.ndarray, ratio: float) -> np.ndarray:
    """Negatives per positive: floor(ratio) plus one more with probability frac(ratio)."""
    if ratio < 0:
        raise UserError(f"prepare.neg_ratio must be >= 0, got {ratio}")
    whole = int(np.floor(ratio))
    return (whole + (_uniform(click_hash) < ratio - whole)).astype(np.int32)


def pack_pool_keys(window: np.ndarray, category: np.ndarray, item: np.ndarray, num_categories: int, num_items: int) -> np.ndarray:
    """(window, category, item) as one int64 key, ordered as the triples are."""
    return (window.astype(np.int64) * num_categories + category) * num_items + item


def count_sorted(keys: np.ndarray, counts: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, occurrences of each, or the sum of their `counts`): `np.unique`
    with counts, by one sort (several times faster)."""
    if counts is None:
        ordered = np.sort(keys)
        starts = run_starts(ordered)
        return ordered[starts], np.diff(np.append(starts, len(ordered)))
    order = np.argsort(keys, kind="stable")  # merges the sorted runs of concatenated tables
    ordered = keys[order]
    starts = run_starts(ordered)
    return ordered[starts], np.add.reduceat(counts[order], starts) if len(starts) else counts[:0]


@dataclass
class NegativePool:
    """The (window, category, item) triples clicked by anyone, that `draw_negatives` draws from:
    `keys` (`pack_pool_keys`, window counted from `first_window`, the first window of the
    data) sorted and distinct, each drawn with weight one ("uniform", `ends` None) or its number
    of clicks ("popularity": `ends` the running total of the clicks, so key k holds the draws
    [ends[k - 1], ends[k])). Built once over all clicks, it is shared by every partition of the
    users; beside `keys` (which may be memory-mapped) it holds a few numbers per (window, category)."""

    keys: np.ndarray  # int64
    ends: Optional[np.ndarray]  # int64
    first_window: int
    num_windows: int
    num_categories: int
    num_items: int

    @classmethod
    def of(cls, keys: np.ndarray, clicks: Optional[np.ndarray], sampling: str, first_window: int, num_windows: int, num_categories: int,
           num_items: int) -> "NegativePool":
        """The pool of `sampling` over distinct `keys` clicked `clicks` times (needed for "popularity" only)."""
        if sampling not in NEG_SAMPLING:
            raise UserError(f"prepare.neg_sampling must be one of {NEG_SAMPLING}, got {sampling!r}")
        ends = np.cumsum(clicks) if sampling == "popularity" else None
        return cls(keys, ends, first_window, num_windows, num_categories, num_items)

    def __post_init__(self) -> None:
        _check_key_space("(window, category, item)", self.num_windows, self.num_categories, self.num_items)
        num_groups = self.num_windows * self.num_categories
        self.window_bounds = self._draw_start(np.searchsorted(self.keys, np.arange(self.num_windows + 1, dtype=np.int64) * self.num_categories * self.num_items))
        if num_groups <= len(self.keys) + DENSE_GROUPS:
            # every (window, category)'s first draw, empty ones included: one lookup per draw
            self.group_starts = self._draw_start(np.searchsorted(self.keys, np.arange(num_groups + 1, dtype=np.int64) * self.num_items))
            self.groups = None
            return
        first = []  # the first key of each (window, category) present, found chunk by chunk: no temporary the size of the pool
        previous = -1
        for start in _chunks(len(self.keys)):
            group = self.keys[start : start + CHUNK] // self.num_items
            first.append(start + np.flatnonzero(np.concatenate(([group[0] != previous], group[1:] != group[:-1]))))
            previous = group[-1]
        first = np.concatenate([np.zeros(0, np.int64), *first])
        self.groups = self.keys[first] // self.num_items
        self.group_starts = self._draw_start(np.append(first, len(self.keys)))

    def group_draws(self, group: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """[lo, hi) of the draws of each (window * num_categories + category); lo == hi where no
        item of that category was clicked in that window."""
        if self.groups is None:
            return self.group_starts[group], self.group_starts[group + 1]
        at = np.minimum(np.searchsorted(self.groups, group), len(self.groups) - 1)
        present = self.groups[at] == group
        return np.where(present, self.group_starts[at], 0), np.where(present, self.group_starts[at + 1], 0)

    def _draw_start(self, index: np.ndarray) -> np.ndarray:
        """The first draw of key `index` (the number of draws for index len(keys))."""
        if self.ends is None:
            return index.astype(np.int64)
        return np.where(index > 0, self.ends[np.maximum(index - 1, 0)], 0)

    def key_at(self, draw: np.ndarray) -> np.ndarray:
        """The key of each draw index."""
        index = draw if self.ends is None else np.searchsorted(self.ends, draw, side="right")
        return self.keys[np.minimum(index, len(self.keys) - 1)]


@dataclass
class NegativeDraw:
    owner: np.ndarray  # int64, non-decreasing: index of the positive (= click) each negative belongs to
    item: np.ndarray  # int32
    category: np.ndarray  # int32: the category the item was clicked under in the window
    requested: int
    unavailable: int  # negatives dropped because every draw was empty or clicked by the user


def draw_negatives(
    clicks: Clicks,
    counts: np.ndarray,
    pool: NegativePool,
    click_hash: np.ndarray,
    *,
    window_start: int,
    window_seconds: int,
    max_draws: int,
    category_span: Optional[int] = None,
) -> NegativeDraw:
    """Draw `counts[i]` negative items for the positive at click i.

    Candidates are the (item, category) pairs clicked by anyone in the positive's window
    (`(ts - window_start) // window_seconds`), from `pool`: "uniform" over the window's distinct
    pairs (so an item's popularity stays a signal a static model can learn), or "popularity", in
    proportion to their clicks.

    `category_span` None: any candidate of the window. An int k: a random click among the last
    k clicks of the positive's history names a category, and the candidate is drawn from the
    window's items of that category, so the negative passes the category filter that looks at
    those k clicks (`filter_span`), like its positive has to. Without that, nearly every negative
    fails the filter and the kept samples are 75-95 % positive instead of the paper's 40 %. A
    positive with an empty history falls back to any candidate of the window.

    A draw that finds no item of the category in the window, or an item the user clicked in
    that window, is redrawn (history click included) up to `max_draws` times in all; negatives
    still unresolved are dropped and counted. The random numbers of the j-th negative's d-th draw
    hash (`click_hash` of its positive, j, d), so a negative does not depend on which other
    clicks are drawn for in the same call. Everything is vectorised over the negatives.
    """
    if window_seconds <= 0:
        raise UserError(f"prepare.neg_window_seconds must be positive, got {window_seconds}")
    window = (clicks.ts.astype(np.int64) - window_start) // window_seconds - pool.first_window
    num_windows, num_categories, num_items = pool.num_windows, pool.num_categories, pool.num_items
    _check_key_space("(user, window, item)", len(clicks.user_offsets), num_windows, num_items)
    clicked = _sorted_unique((clicks.user.astype(np.int64) * num_windows + window) * num_items + clicks.item)
    # the history of click i is clicks [i - back[i], i - back[i] + history[i]) of the whole array
    back = clicks.pos
    history = back if clicks.history_end is None else clicks.history_end

    def candidate_ranges(owner: np.ndarray, w: np.ndarray, uniform: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """[lo, hi) of pool draws for each owner: its window, or one of its history's categories
        in its window (lo == hi where that category has no item in the window)."""
        lo, hi = pool.window_bounds[w], pool.window_bounds[w + 1]
        if category_span is None:
            return lo, hi
        span = np.minimum(history[owner], category_span)
        has = np.flatnonzero(span)
        known = owner[has]
        source = known - back[known] + history[known] - 1 - (uniform[has] * span[has]).astype(np.int64)
        lo[has], hi[has] = pool.group_draws(w[has] * num_categories + clicks.category[source])
        return lo, hi

    def fill(owner: np.ndarray, negative_hash: np.ndarray, item: np.ndarray, category: np.ndarray) -> np.ndarray:
        """Fill `item` and `category` for negatives of these owners; return the indices left unresolved."""
        pending = np.arange(len(owner), dtype=np.int64)
        for attempt in range(max_draws):
            if not len(pending):
                break
            o = owner[pending]
            w = window[o]
            with np.errstate(over="ignore"):
                h = negative_hash[pending] + np.uint64(2 * attempt)
                lo, hi = candidate_ranges(o, w, _uniform(splitmix64(h + np.uint64(1))))
                pick = lo + (_uniform(splitmix64(h)) * (hi - lo)).astype(np.int64)
            key = pool.key_at(pick)
            candidate = key % num_items
            taken = (hi == lo) | _contains(clicked, (clicks.user[o].astype(np.int64) * num_windows + w) * num_items + candidate)
            free = ~taken
            item[pending[free]] = candidate[free]
            category[pending[free]] = key[free] // num_items % num_categories
            pending = pending[taken]
        return pending

    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first_negative = np.cumsum(counts, dtype=np.int64) - counts
    item = np.zeros(len(owner), dtype=np.int32)
    category = np.zeros(len(owner), dtype=np.int32)
    unresolved = []
    for start in _chunks(len(owner)):
        chunk = owner[start : start + CHUNK]
        ordinal = np.arange(start, start + len(chunk), dtype=np.int64) - first_negative[chunk]
        with np.errstate(over="ignore"):
            negative_hash = splitmix64(click_hash[chunk] + ordinal.astype(np.uint64))
        unresolved.append(start + fill(chunk, negative_hash, item[start : start + CHUNK], category[start : start + CHUNK]))
    requested = len(owner)
    if unresolved and sum(map(len, unresolved)):
        ok = np.ones(requested, dtype=bool)
        ok[np.concatenate(unresolved)] = False
        owner, item, category = owner[ok], item[ok], category[ok]
    return NegativeDraw(owner=owner, item=item, category=category, requested=requested, unavailable=requested - len(owner))


def with_negatives(clicks: Clicks, draw: NegativeDraw, start: int = 0, stop: Optional[int] = None) -> Samples:
    """Samples of clicks [start, stop), each positive followed by its negatives.

    A negative copies its positive's user, pos and ts (same moment, same history). Taking a
    range of clicks lets the caller go through all samples in bounded memory.
    """
    stop = len(clicks.user) if stop is None else stop
    first, last = np.searchsorted(draw.owner, [start, stop])
    owner = draw.owner[first:last] - start
    n, m = stop - start, len(owner)
    per_click = np.bincount(owner, minlength=n)
    before = np.cumsum(per_click) - per_click  # negatives of the clicks before click i
    pos_dest = np.arange(n, dtype=np.int64) + before
    neg_dest = owner + 1 + np.arange(m, dtype=np.int64)

    def interleave(pos_values: np.ndarray, neg_values: np.ndarray) -> np.ndarray:
        out = np.empty(n + m, dtype=pos_values.dtype)
        out[pos_dest] = pos_values
        out[neg_dest] = neg_values
        return out

    def spread(column: np.ndarray) -> np.ndarray:
        values = column[start:stop]
        return interleave(values, values[owner])

    history = clicks.history_lengths(start, stop)

    return Samples(
        user=spread(clicks.user),
        pos=interleave(history, history[owner]),
        item=interleave(clicks.item[start:stop], draw.item[first:last]),
        category=interleave(clicks.category[start:stop], draw.category[first:last]),
        label=interleave(np.ones(n, dtype=np.int8), np.zeros(m, dtype=np.int8)),
        ts=spread(clicks.ts),
    )


def has_history(samples: Samples) -> np.ndarray:
    """Mask of samples with at least one earlier click."""
    return samples.pos > 0


class CategoryHistory:
    """The clicks as sorted (user, category, pos) keys: built once, then it tells for any
    samples where their user last clicked their category before `pos`."""

    def __init__(self, clicks: Clicks) -> None:
        self.num_categories = int(clicks.category.max(initial=0)) + 1
        self.span = int(np.diff(clicks.user_offsets).max(initial=0)) + 1
        _check_key_space("(user, category, pos)", len(clicks.user_offsets), self.num_categories, self.span)
        self.keys = np.sort(self._pack(clicks.user, clicks.category, clicks.pos))

    def _pack(self, user: np.ndarray, category: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return (user.astype(np.int64) * self.num_categories + category) * self.span + pos

    def gap(self, samples: Samples) -> np.ndarray:
        """pos minus the position of the user's latest earlier click of the sample's category
        (1 = the last click of the history), or NO_PREVIOUS where there is none.

        A sample's own key, searched on the left, lands just after every strictly earlier
        same-category click of its user. Sample categories must be click categories.
        """
        queries = self._pack(samples.user, samples.category, samples.pos)
        previous = np.searchsorted(self.keys, queries) - 1
        found = previous >= 0
        found[found] = self.keys[previous[found]] // self.span == queries[found] // self.span
        gap = np.full(len(samples), NO_PREVIOUS, dtype=np.int32)
        gap[found] = queries[found] - self.keys[previous[found]]
        return gap


def category_filter(history: CategoryHistory, samples: Samples, mode: str, history_length: int, last_k: int) -> np.ndarray:
    """Mask of samples whose target category is in the history:

    "last_l": among the last `history_length` clicks, the history the model sees (the paper's
    filter); "any": anywhere among the user's earlier clicks; "last_k": among the last
    `last_k` clicks; "none": keep all.
    """
    span = filter_span(mode, history_length, last_k)
    if span is None:
        return np.ones(len(samples), dtype=bool)
    return history.gap(samples) <= span


def split_bounds_by_days(window_start: int, window_days: int, valid_days: int, test_days: int) -> Tuple[int, int]:
    """(first validation ts, first test ts): the last `test_days` days of the window are test,
    the `valid_days` days before them validation, the rest training."""
    if valid_days < 1 or test_days < 0 or valid_days + test_days >= window_days:
        raise UserError(
            f"prepare.valid_days must be >= 1, prepare.test_days >= 0 and together below window_days ({window_days}), "
            f"got {valid_days} and {test_days}"
        )
    test_start = window_start + (window_days - test_days) * SECONDS_PER_DAY
    return test_start - valid_days * SECONDS_PER_DAY, test_start


def split_bounds_by_fraction(first_ts: int, last_ts: int, valid_fraction: float, test_fraction: float) -> Tuple[int, int]:
    """(first validation ts, first test ts) cutting the seconds [first_ts, last_ts] so that the
    last `test_fraction` of them are test and the `valid_fraction` before them validation."""
    if not (0 < valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise UserError(
            f"prepare.valid_fraction must be > 0, prepare.test_fraction >= 0 and together below 1, got {valid_fraction} and {test_fraction}"
        )
    span = last_ts - first_ts + 1
    test_start = last_ts + 1 - int(round(test_fraction * span))
    return test_start - int(round(valid_fraction * span)), test_start


def assign_split(ts: np.ndarray, valid_start: int, test_start: int) -> np.ndarray:
    """Split code per sample (index into SPLITS): ts before `valid_start` is training, from
    `test_start` on test, validation between. Cuts in time, so the splits never overlap in time.

    Validation and test histories may hold earlier clicks: they are the past, not the future.
    """
    return (ts >= valid_start).astype(np.int8) + (ts >= test_start).astype(np.int8)


def split_counts(labels: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Rows per split, then positives per split (the order of SPLITS): int64 [6]."""
    # one count per (split, label): bincount without float weights
    by_label = np.bincount(split * np.int8(2) + labels, minlength=2 * len(SPLITS)).reshape(len(SPLITS), 2)
    return np.concatenate([by_label.sum(axis=1), by_label[:, 1]])
