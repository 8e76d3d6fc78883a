"""Synthetic Taobao UserBehavior data: `user,item,category,behavior,ts` CSV, no header.

It is the embedded default for demos and tests, so it has the real file's marginals and a signal
that both a static and a sequential CTR model can learn. The generative model:

- Catalog. Category popularity is Zipf (rank^-1); category sizes follow the same skew
  (1 + a multinomial share of the remaining items); inside a category, item popularity is Zipf
  by rank. Raw item and category ids are shuffled, so an id says nothing about popularity.
- Users. Row counts per user are 1 + a multinomial share with log-normal weights (heavy tail,
  exact total). Each user has `PREFERRED_CATEGORIES` long-term categories drawn by popularity,
  with Dirichlet weights: the *static* signal (user x category).
- Sessions. A user's rows are cut into sessions (geometric length). A session has a main and
  a second category, each one of the user's preferred categories with probability
  `SESSION_PREFERRED`, else a popular one. A click's category is the session's main one, its
  second one, or a popular one (`CLICK_CATEGORY_MIX`); its item is Zipf inside that category.
- Recency. With probability `ANCHOR_PROBABILITY` a click refers back to one of the last
  `ANCHOR_LAG` clicks of its session: the same item (`EXACT_REPEAT`) or an item next to it in
  the category's popularity order. Cart, fav and buy always repeat an item seen earlier in the
  session, as in the real file. Sticky sessions and these references are the *sequential* signal.
- Behavior is pv/cart/fav/buy in the real mix; time spans 9 days from 2017-11-25 00:00 Beijing
  time, session starts follow a diurnal profile, clicks inside a session are seconds apart, and
  a session never starts before the user's previous one ends, so rows are grouped by user and
  time-ordered within a user, like the real file (heavy users click faster so that their rows
  fit the window; a session running past the end is clipped to its last second).

Sizes scale with the row count in the real file's ratios unless given (so a small file has few
categories: 19 at 200K rows; pass `categories` for more). Users are generated in
blocks (vectorised numpy, one seeded generator per block) and streamed through pyarrow's CSV
writer, so memory is bounded by the block and the catalog, and the same seed and sizes give a
byte-identical file. A `.gz` suffix writes gzip.
"""

from __future__ import annotations

import argparse
import json
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

CATEGORY_ZIPF = 1.0
ITEM_ZIPF = 1.1
USER_ACTIVITY_SIGMA = 1.0
PREFERRED_CATEGORIES = 3
MEAN_SESSION_CLICKS = 12.0
SESSION_PREFERRED = 0.75
# a click's category: session main, session second, popular
CLICK_CATEGORY_MIX = (0.75, 0.15, 0.10)
ANCHOR_PROBABILITY = 0.3
ANCHOR_LAG = 5
EXACT_REPEAT = 0.5
NEIGHBOR_SPREAD = 3
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
    """Fill the sizes not given from the row count in the real file's ratios, and check them."""
    if rows <= 0:
        raise UserError(f"rows must be positive, got {rows}")
    if categories is None:
        categories = max(1, round(rows * REAL_CATEGORIES / REAL_ROWS))
    if items is None:
        items = max(categories, round(rows * REAL_ITEMS / REAL_ROWS))
    if users is None:
        users = max(1, round(rows * REAL_USERS / REAL_ROWS))
    if not 1 <= users <= rows:
        raise UserError(f"users must be between 1 and rows ({rows}), got {users}")
    if categories < 1:
        raise UserError(f"categories must be positive, got {categories}")
    if items < categories:
        raise UserError(f"items ({items}) must be at least categories ({categories}): every category needs an item")
    return SynthSizes(rows=rows, users=users, items=items, categories=categories)


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def _sampling_table(weights: np.ndarray, slots: int) -> np.ndarray:
    """`slots` entries in which index i appears about weights[i] * slots times and at least once.

    The table *is* the distribution: a uniform slot draws i with its share of slots, one gather
    per draw instead of a binary search over a CDF (the hot spot otherwise)."""
    counts = 1 + np.floor(weights * (slots - len(weights))).astype(np.int64)
    counts[: slots - counts.sum()] += 1  # the few slots left over go to the most popular
    return np.repeat(np.arange(len(weights), dtype=np.int32), counts)


def _segment_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1]))


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random(n, dtype=np.float32)


class _World:
    """What every block shares: the catalog and the users' long-term tastes."""

    def __init__(self, sizes: SynthSizes, rng: np.random.Generator):
        c = sizes.categories
        popularity = _zipf_weights(c, CATEGORY_ZIPF)
        self.category_table = _sampling_table(popularity, max(1 << 20, 16 * c))
        self.category_size = 1 + rng.multinomial(sizes.items - c, popularity)
        self.category_first_item = _segment_starts(self.category_size)
        # inverse CDF of a continuous power law on [1, size + 1): rank = (1 + u * scale)^power - 1
        # (float32: ranks stay exact enough below 2^24 items per category, and it is the hot spot)
        self.rank_scale = ((self.category_size + 1.0) ** (1.0 - ITEM_ZIPF) - 1.0).astype(np.float32)
        self.rank_power = np.float32(1.0 / (1.0 - ITEM_ZIPF))
        self.category_id = (1 + rng.permutation(c)).astype(np.int32)
        self.item_id = (1 + rng.permutation(sizes.items)).astype(np.int32)
        activity = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, sizes.users)
        self.user_rows = 1 + rng.multinomial(sizes.rows - sizes.users, activity / activity.sum())
        self.preferred = self.popular_categories(rng, sizes.users * PREFERRED_CATEGORIES).reshape(sizes.users, -1)
        self.preferred_cdf = np.cumsum(rng.dirichlet(np.ones(PREFERRED_CATEGORIES), sizes.users), axis=1)

    def popular_categories(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.category_table[rng.integers(0, len(self.category_table), n)]

    def user_categories(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per entry: one of that user's preferred categories w.p. SESSION_PREFERRED, else a popular one."""
        n = len(users)
        slot = (rng.random(n)[:, None] > self.preferred_cdf[users]).sum(axis=1).clip(0, PREFERRED_CATEGORIES - 1)
        chosen = self.preferred[users, slot]
        popular = np.flatnonzero(_uniform(rng, n) >= SESSION_PREFERRED)
        chosen[popular] = self.popular_categories(rng, len(popular))
        return chosen

    def item_ranks(self, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Zipf(ITEM_ZIPF) popularity ranks inside each given category."""
        x = (1.0 + _uniform(rng, len(category)) * self.rank_scale[category]) ** self.rank_power
        return np.minimum(x.astype(np.int32) - 1, self.category_size[category] - 1)


def _categories_and_items(
    world: _World,
    row_session: np.ndarray,
    pos: np.ndarray,
    behavior: np.ndarray,
    session_user: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's category and item index: sticky sessions, then references to recent clicks."""
    n = len(row_session)
    main, second = world.user_categories(session_user, rng), world.user_categories(session_user, rng)
    category = main[row_session]
    pick = _uniform(rng, n)
    rows = np.flatnonzero((pick >= CLICK_CATEGORY_MIX[0]) & (pick < CLICK_CATEGORY_MIX[0] + CLICK_CATEGORY_MIX[1]))
    category[rows] = second[row_session[rows]]
    rows = np.flatnonzero(pick >= CLICK_CATEGORY_MIX[0] + CLICK_CATEGORY_MIX[1])
    category[rows] = world.popular_categories(rng, len(rows))
    rank = world.item_ranks(category, rng)

    # anchored rows refer back 1..ANCHOR_LAG clicks within the session; follow the references to
    # an independently drawn row (the root), whose values are final
    anchored = (pos > 0) & ((_uniform(rng, n) < ANCHOR_PROBABILITY) | (behavior > 0))
    rows = np.flatnonzero(anchored)
    source = np.arange(n, dtype=np.int32)
    source[rows] -= 1 + (_uniform(rng, len(rows)) * np.minimum(pos[rows], ANCHOR_LAG)).astype(np.int32)
    root = source[rows]
    pending = np.flatnonzero(anchored[root])
    while len(pending):
        root[pending] = source[root[pending]]
        pending = pending[anchored[root[pending]]]
    category[rows] = category[root]
    exact = (behavior[rows] > 0) | (_uniform(rng, len(rows)) < EXACT_REPEAT)
    rank[rows[exact]] = rank[root[exact]]
    near, near_root = rows[~exact], root[~exact]
    offset = 1 + (_uniform(rng, len(near)) * NEIGHBOR_SPREAD).astype(np.int32)
    offset[_uniform(rng, len(near)) < 0.5] *= -1
    rank[near] = (rank[near_root] + offset) % world.category_size[category[near]]
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
    pos = np.arange(n, dtype=np.int32) - session_first_row[row_session]
    # behavior code (index into BEHAVIORS): how many cumulative shares a uniform draw passes
    u = _uniform(rng, n)
    behavior = sum((u >= share).view(np.int8) for share in np.cumsum(BEHAVIOR_SHARES)[:-1])
    category, item = _categories_and_items(world, row_session, pos, behavior, session_user, rng)
    # heavy users click faster, so that their clicks take a quarter of the window on average
    mean_gap = np.minimum(MEAN_CLICK_GAP_SECONDS, WINDOW_SECONDS / (4.0 * user_rows)).astype(np.float32)
    ts = _timestamps(row_session, session_first_row, session_user, np.repeat(mean_gap, user_rows), rng)
    columns = [
        row_user,
        world.item_id[item],
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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output CSV path or URI (.csv, or .csv.gz for gzip)")
    parser.add_argument("--rows", type=int, required=True, help="number of rows to write")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--users", type=int, default=None, help="default: rows x the real file's users/rows")
    parser.add_argument("--items", type=int, default=None, help="default: rows x the real file's items/rows")
    parser.add_argument("--categories", type=int, default=None, help="default: rows x the real file's categories/rows")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
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
