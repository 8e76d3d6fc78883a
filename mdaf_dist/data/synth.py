"""Synthetic Taobao UserBehavior data: `user,item,category,behavior,ts` CSV, no header.

It is the embedded default for demos, tests and tiny studies, so its statistics are set by the
real data set's (`mdaf_dist.data.stats` measures both; `mdaf synth --stats FILE`): the
whole catalog is simulated whatever the row count, and a file of N rows is N / 101 users of the
full data set, so small files have the real file's item and category diversity, not a shrunken
world. The generative model:

- Catalog: the real data set's 9,439 categories and 4.16M items. Category popularity is Zipf
  (`CATEGORY_ZIPF`), a category's item count grows with its popularity (`CATEGORY_SIZE_POWER`),
  and inside a category item popularity is Zipf by rank (`ITEM_ZIPF`): clicks spread thinly
  (top 1 % of items about 5 % of clicks, most items clicked once in a small sample). Raw
  category ids are shuffled and item ids a seeded affine bijection of the item index, so an id
  says nothing about popularity.
- Users: row counts per user are 1 + a multinomial share with log-normal weights (median about
  85, mean 101 as in the real file, exact total). Each user has `PREFERRED_CATEGORIES`
  long-term categories with Dirichlet weights, each the most popular of `PREFERRED_HEAD`
  popularity draws: tastes lean to the popular head, where other users' clicks (and so the
  negatives of `mdaf prepare`) are too, which keeps the static signal at the real file's
  strength.
- Each of a user's clicks after the first either refers back to an earlier click of the user
  (the previous one w.p. `STAY`, an older one w.p. `RETURN`, recent ones likelier: `LAG_SKEW`) and
  takes its category, or is a fresh category: one of the user's preferred categories w.p.
  `FRESH_PREFERRED`, else a popular one. A reference repeats the item w.p. `EXACT_REPEAT`, else
  draws another item of the category; a fresh category draws an item by popularity. Cart, fav
  and buy repeat one of the last `VIEW_LAG` rows' items w.p. `AFTER_VIEW`, else the user's
  previous cart/fav/buy's item w.p. `AFTER_BOUGHT`, else an item drawn like a click's: about
  20 % follow a view of the item, as in the real file.
- The planted signal, at the real file's strength (the tiny MDAF's validation AUC 0.65-0.70 on
  4K-8K rows, as on real histories; about 0.75 with tastes drawn like any other category):
  *sequential*, the clicked category is the previous click's about 40 % of the time and among
  the last 50 clicks about 70 % (real: 0.40 / 0.62 / 0.70 for the last 1 / 10 / 50), and about
  19 % of clicks repeat an item; *static*, users keep returning to their preferred categories,
  and popular items are clicked more. About 30 % of clicks are in a category new to the last
  50, so the paper's category filter drops about 30 % of positives, as on real histories.
- Behavior is pv/cart/fav/buy in the real mix; time spans 9 days from 2017-11-25 00:00 Beijing
  time. A user's rows are cut into sessions (geometric length); session starts follow a diurnal
  profile on random days (about 6.6 active days for a median user), clicks inside a session are
  seconds apart, and a session never starts before the user's previous one ends, so rows are
  grouped by user and time-ordered within a user, like the real file (heavy users click faster
  so that their rows fit the window; a session running past the end is clipped to its last
  second).

Users are generated in blocks (vectorised numpy, one seeded generator per block) and streamed
through pyarrow's CSV writer, so memory is bounded by the block and the users' tastes (330 MB
for 4M rows), and the same seed and sizes give a byte-identical file. `users`, `items` and
`categories` may be given to simulate another world. A `.gz` suffix writes gzip.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
from tqdm import tqdm

from mdaf_dist.config import SECONDS_PER_DAY, TAOBAO_START_TS
from mdaf_dist.errors import UserError

# The real file: rows, users, items, categories.
REAL_ROWS = 100_150_807
REAL_USERS = 987_994
REAL_ITEMS = 4_162_024
REAL_CATEGORIES = 9_439

BEHAVIORS = ("pv", "cart", "fav", "buy")
BEHAVIOR_SHARES = (0.895, 0.055, 0.029, 0.021)
WINDOW_DAYS = 9
WINDOW_SECONDS = WINDOW_DAYS * SECONDS_PER_DAY

CATEGORY_ZIPF = 1.12
CATEGORY_ZIPF_OFFSET = 10.0
CATEGORY_SIZE_POWER = 0.7
ITEM_ZIPF = 0.6
USER_ACTIVITY_SIGMA = 0.6
PREFERRED_CATEGORIES = 5
PREFERRED_HEAD = 3
MEAN_SESSION_CLICKS = 7.5
STAY = 0.34
RETURN = 0.23
LAG_SKEW = 2.0
FRESH_PREFERRED = 0.45
EXACT_REPEAT = 0.35
AFTER_VIEW = 0.07
AFTER_BOUGHT = 0.5
VIEW_LAG = 5
MEAN_CLICK_GAP_SECONDS = 40.0
# relative session starts per hour of the day (Beijing time): quiet at night, peak in the evening
HOURLY_ACTIVITY = (
    3, 1.5, 1, 0.7, 0.6, 0.8, 1.5, 2.5, 3.5, 4, 4.2, 4.3,
    4.3, 4.3, 4.3, 4.2, 4.2, 4.1, 4.3, 5, 6, 6.5, 6, 4.5,
)  # fmt: skip
BLOCK_ROWS = 1 << 21
CSV_SCHEMA = pa.schema(
    [
        ("user", pa.int32()),
        ("item", pa.int32()),
        ("category", pa.int32()),
        ("behavior", pa.dictionary(pa.int8(), pa.string())),
        ("ts", pa.int64()),
    ]
)


@dataclass(frozen=True)
class SynthSizes:
    rows: int
    users: int
    items: int
    categories: int


def resolve_sizes(
    rows: int, users: Optional[int] = None, items: Optional[int] = None, categories: Optional[int] = None
) -> SynthSizes:
    """Fill the sizes not given (the real catalog; users in the real file's rows per user), and check them."""
    if rows <= 0:
        raise UserError(f"rows must be positive, got {rows}")
    categories = REAL_CATEGORIES if categories is None else categories
    items = max(REAL_ITEMS, categories) if items is None else items
    if users is None:
        users = max(1, round(rows * REAL_USERS / REAL_ROWS))
    if not 1 <= users <= rows:
        raise UserError(f"users must be between 1 and rows ({rows}), got {users}")
    if categories < 1:
        raise UserError(f"categories must be positive, got {categories}")
    if items < categories:
        raise UserError(f"items ({items}) must be at least categories ({categories}): every category needs an item")
    return SynthSizes(rows=rows, users=users, items=items, categories=categories)


def _zipf_weights(n: int, exponent: float, offset: float = 0.0) -> np.ndarray:
    """Zipf-Mandelbrot: weight of rank k is (k + offset)^-exponent (offset flattens the head)."""
    weights = (np.arange(1, n + 1, dtype=np.float64) + offset) ** -exponent
    return weights / weights.sum()


def _sampling_table(weights: np.ndarray, slots: int) -> np.ndarray:
    """`slots` entries in which index i appears about weights[i] * slots times and at least once.

    The table *is* the distribution: a uniform slot draws i with its share of slots, one gather
    per draw instead of a binary search over a CDF (the hot spot otherwise)."""
    counts = 1 + np.floor(weights * (slots - len(weights))).astype(np.int64)
    counts[: slots - counts.sum()] += 1  # the few slots left over go to the most popular
    return np.repeat(np.arange(len(weights), dtype=np.int32), counts)


def _coprime(n: int, rng: np.random.Generator) -> int:
    """A multiplier m coprime to n, so that i -> (i * m + b) mod n permutes range(n)."""
    while math.gcd(m := int(rng.integers(n // 3, 2 * n // 3 + 2)), n) != 1:
        pass
    return m


def _segment_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1]))


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random(n, dtype=np.float32)


class _World:
    """What every block shares: the catalog and the users' row counts and long-term tastes."""

    def __init__(self, sizes: SynthSizes, rng: np.random.Generator):
        c = sizes.categories
        popularity = _zipf_weights(c, CATEGORY_ZIPF, CATEGORY_ZIPF_OFFSET)
        self.category_table = _sampling_table(popularity, max(1 << 20, 16 * c))
        size_share = popularity**CATEGORY_SIZE_POWER
        self.category_size = 1 + rng.multinomial(sizes.items - c, size_share / size_share.sum())
        self.category_first_item = _segment_starts(self.category_size)
        # inverse CDF of a continuous power law on [1, size + 1): rank = (1 + u * scale)^power - 1
        # (float32: ranks stay exact enough below 2^24 items per category, and it is the hot spot)
        self.rank_scale = ((self.category_size + 1.0) ** (1.0 - ITEM_ZIPF) - 1.0).astype(np.float32)
        self.rank_power = np.float32(1.0 / (1.0 - ITEM_ZIPF))
        self.category_id = (1 + rng.permutation(c)).astype(np.int32)
        # item ids: a seeded affine bijection of item indices (a permutation of 4M ids would cost a
        # second even for a file of 1K rows)
        self.items = sizes.items
        self.item_offset = int(rng.integers(0, sizes.items))
        self.item_multiplier = _coprime(sizes.items, rng)
        activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, sizes.users)
        self.user_rows = 1 + rng.multinomial(sizes.rows - sizes.users, activity / activity.sum())
        draws = self.popular_categories(rng, PREFERRED_HEAD * sizes.users * PREFERRED_CATEGORIES)
        self.preferred = draws.reshape(PREFERRED_HEAD, -1).min(axis=0).reshape(sizes.users, -1)
        self.preferred_cdf = np.cumsum(rng.dirichlet(np.ones(PREFERRED_CATEGORIES), sizes.users), axis=1)

    def item_ids(self, index: np.ndarray) -> np.ndarray:
        return (1 + (index.astype(np.int64) * self.item_multiplier + self.item_offset) % self.items).astype(np.int32)

    def popular_categories(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.category_table[rng.integers(0, len(self.category_table), n)]

    def fresh_categories(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per entry: one of that user's preferred categories w.p. FRESH_PREFERRED, else a popular one."""
        n = len(users)
        slot = (rng.random(n)[:, None] > self.preferred_cdf[users]).sum(axis=1).clip(0, PREFERRED_CATEGORIES - 1)
        chosen = self.preferred[users, slot]
        popular = np.flatnonzero(_uniform(rng, n) >= FRESH_PREFERRED)
        chosen[popular] = self.popular_categories(rng, len(popular))
        return chosen

    def item_ranks(self, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Zipf(ITEM_ZIPF) popularity ranks inside each given category."""
        x = (1.0 + _uniform(rng, len(category)) * self.rank_scale[category]) ** self.rank_power
        return np.minimum(x.astype(np.int32) - 1, self.category_size[category] - 1)


def _references(pos: np.ndarray, behavior: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the earlier row of its user it refers to (itself if none), whether it refers to
    one (and takes its category), and whether it also takes that row's item."""
    n = len(pos)
    u = _uniform(rng, n)
    refers = (pos > 0) & (u < STAY + RETURN)
    lag = np.ones(n, dtype=np.int32)
    back = np.flatnonzero(refers & (u >= STAY))
    lag[back] = 2 + ((pos[back] - 1) * _uniform(rng, len(back)) ** LAG_SKEW).astype(np.int32)
    exact = refers & (_uniform(rng, n) < EXACT_REPEAT)
    # a cart/fav/buy repeats a recent row's item, or the user's previous cart/fav/buy's item, or
    # is of an item drawn like a click's
    bought = behavior > 0
    viewed = bought & (pos > 0) & (_uniform(rng, n) < AFTER_VIEW)
    lag[viewed] = 1 + (_uniform(rng, int(viewed.sum())) * np.minimum(pos[viewed], VIEW_LAG)).astype(np.int32)
    rows = np.flatnonzero(bought)
    since = np.diff(rows, prepend=-n)  # rows since the previous cart/fav/buy
    again = (since <= pos[rows]) & ~viewed[rows] & (_uniform(rng, len(rows)) < AFTER_BOUGHT)
    lag[rows[again]] = since[again]
    viewed[rows[again]] = True
    refers |= viewed
    exact = (exact & ~bought) | viewed
    source = np.arange(n, dtype=np.int32) - np.where(refers, np.minimum(lag, pos), 0)
    return source, refers, exact


def _roots(source: np.ndarray, linked: np.ndarray) -> np.ndarray:
    """Per row: the first row up its chain of `source` links (followed while `linked`)."""
    root = np.arange(len(source), dtype=np.int32)
    pending = np.flatnonzero(linked)
    while len(pending):
        root[pending] = source[root[pending]]
        pending = pending[linked[root[pending]]]
    return root


def _categories_and_items(
    world: _World, row_user: np.ndarray, pos: np.ndarray, behavior: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's category and item index: fresh draws, and references to the user's earlier rows."""
    source, refers, exact = _references(pos, behavior, rng)
    category = np.zeros(len(pos), dtype=np.int32)
    fresh = np.flatnonzero(~refers)
    category[fresh] = world.fresh_categories(row_user[fresh], rng)
    category = category[_roots(source, refers)]
    rank = np.zeros(len(pos), dtype=np.int32)
    drawn = np.flatnonzero(~exact)
    rank[drawn] = world.item_ranks(category[drawn], rng)
    rank = rank[_roots(source, exact)]
    return category, world.category_first_item[category] + rank


def _timestamps(
    row_session: np.ndarray,
    session_first_row: np.ndarray,
    session_user: np.ndarray,
    row_mean_gap: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Unix seconds, non-decreasing within each user (sessions are grouped by user).

    A session starts at a diurnal time of a random day, but never before the user's previous
    session ends: start_k = max(wish_k, start_{k-1} + length_{k-1}), which is a running maximum of
    (wish_k - time spent in the user's earlier sessions), offset per user so users do not mix."""
    n, s = len(row_session), len(session_first_row)
    gaps = np.rint(rng.standard_exponential(n, dtype=np.float32) * row_mean_gap).astype(np.int64)
    gaps[session_first_row] = 0
    within = np.cumsum(gaps)
    within -= within[session_first_row][row_session]
    session_length = within[np.append(session_first_row[1:], n) - 1] + 1
    session_is_first = np.r_[True, session_user[1:] != session_user[:-1]]
    earlier = np.cumsum(session_length) - session_length
    earlier -= earlier[np.flatnonzero(session_is_first)][np.cumsum(session_is_first) - 1]
    hour_cdf = np.cumsum(HOURLY_ACTIVITY) / np.sum(HOURLY_ACTIVITY)
    hour = np.searchsorted(hour_cdf, rng.random(s), side="right").clip(0, 23)
    wish = rng.integers(0, WINDOW_DAYS, s) * SECONDS_PER_DAY + hour * 3600 + rng.integers(0, 3600, s)
    user_key = (session_user - session_user[0]).astype(np.int64) * (WINDOW_SECONDS + int(earlier.max()) + 1)
    wish = np.sort(wish + user_key) - user_key  # ascending within each user
    start = np.maximum.accumulate(wish - earlier + user_key) - user_key + earlier
    return TAOBAO_START_TS + np.minimum(start[row_session] + within, WINDOW_SECONDS - 1)


def _block_table(world: _World, first_user: int, last_user: int, rng: np.random.Generator) -> pa.Table:
    """Rows of users [first_user, last_user), grouped by user and time-ordered."""
    user_rows = world.user_rows[first_user:last_user]
    n = int(user_rows.sum())
    row_user = np.repeat(np.arange(first_user + 1, last_user + 1, dtype=np.int32), user_rows)
    # sessions: a new one at each user's first row, else with probability 1 / mean length
    new_session = _uniform(rng, n) < 1.0 / MEAN_SESSION_CLICKS
    new_session[_segment_starts(user_rows)] = True
    session_first_row = np.flatnonzero(new_session)
    row_session = np.cumsum(new_session, dtype=np.int32) - 1
    session_user = row_user[session_first_row] - 1
    pos = np.arange(n, dtype=np.int32) - np.repeat(_segment_starts(user_rows), user_rows).astype(np.int32)
    # behavior code (index into BEHAVIORS): how many cumulative shares a uniform draw passes
    u = _uniform(rng, n)
    behavior = sum((u >= share).view(np.int8) for share in np.cumsum(BEHAVIOR_SHARES)[:-1])
    category, item = _categories_and_items(world, row_user - 1, pos, behavior, rng)
    # heavy users click faster, so that their clicks take a quarter of the window on average
    mean_gap = np.minimum(MEAN_CLICK_GAP_SECONDS, WINDOW_SECONDS / (4.0 * user_rows)).astype(np.float32)
    ts = _timestamps(row_session, session_first_row, session_user, np.repeat(mean_gap, user_rows), rng)
    columns = [
        row_user,
        world.item_ids(item),
        world.category_id[category],
        pa.DictionaryArray.from_arrays(pa.array(behavior), pa.array(BEHAVIORS)),
        ts,
    ]
    return pa.table(columns, schema=CSV_SCHEMA)


def _open_output(path: str) -> pa.NativeFile:
    filesystem, fs_path = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    parent = fs_path.rsplit("/", 1)[0] if "/" in fs_path else ""
    if parent:
        filesystem.create_dir(parent, recursive=True)
    return filesystem.open_output_stream(fs_path, compression="gzip" if path.endswith(".gz") else None)


def generate(
    path: str,
    rows: int,
    *,
    seed: int = 42,
    users: Optional[int] = None,
    items: Optional[int] = None,
    categories: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Write `rows` synthetic UserBehavior rows to `path` (local path or URI; `.gz` -> gzip).

    Returns the sizes used, the seed, and the row count of each behavior.
    """
    sizes = resolve_sizes(rows, users, items, categories)
    if seed < 0:
        raise UserError(f"seed must be non-negative, got {seed}")
    world_seed, blocks_seed = np.random.SeedSequence(seed).spawn(2)
    world = _World(sizes, np.random.default_rng(world_seed))
    # blocks of whole users, about BLOCK_ROWS rows each; each block draws from its own generator
    user_end = np.cumsum(world.user_rows)
    cuts = np.searchsorted(user_end, np.arange(BLOCK_ROWS, sizes.rows, BLOCK_ROWS), side="left") + 1
    bounds = np.unique(np.concatenate(([0], cuts, [sizes.users])))
    block_seeds = blocks_seed.spawn(len(bounds) - 1)
    counts = np.zeros(len(BEHAVIORS), dtype=np.int64)
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with _open_output(path) as sink, tqdm(
        total=sizes.rows, unit="row", unit_scale=True, disable=not progress, file=sys.stderr, desc="synth"
    ) as bar:
        writer = pacsv.CSVWriter(sink, CSV_SCHEMA, write_options=options)
        for (first, last), block_seed in zip(zip(bounds[:-1], bounds[1:]), block_seeds):
            table = _block_table(world, int(first), int(last), np.random.default_rng(block_seed))
            writer.write_table(table)
            counts += np.bincount(table["behavior"].chunk(0).indices.to_numpy(), minlength=len(BEHAVIORS))
            bar.update(table.num_rows)
        writer.close()
    return {**asdict(sizes), "seed": seed, "behaviors": dict(zip(BEHAVIORS, counts.tolist()))}


def run(args: argparse.Namespace) -> int:
    if args.stats:
        from mdaf_dist.data import stats

        events, rejected = stats.read_events(args.stats)
        print(stats.table(stats.compute(events, seed=args.seed), rejected))
        return 0
    if args.out is None or args.rows is None:
        raise UserError("give --out and --rows to write a file, or --stats FILE to measure one")
    summary = generate(
        args.out,
        args.rows,
        seed=args.seed,
        users=args.users,
        items=args.items,
        categories=args.categories,
        progress=not args.no_progress,
    )
    print(json.dumps({"out": args.out, **summary}))
    return 0
