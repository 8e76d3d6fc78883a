"""The statistics that say whether a UserBehavior file behaves like the real data set.

Studies measure what filters, negatives and histories do, so a synthetic file must match the real
one where those act: how many items and categories a sample of users touches, how concentrated
clicks are, how users move between categories and items. `compute` measures them on any
UserBehavior CSV (synthetic or real, read by the validating ingest), `TARGETS` holds the real data
set's values, and `mdaf synth --stats FILE` prints the two side by side.

Definitions. Clicks are pv rows; a user's clicks are taken in (time, file) order. "In the last k"
means among the user's k clicks before this one (clicks with at least one earlier click). The
repeat rate is the share of clicks whose item the user clicked before. "After a view" is the share
of cart/fav/buy rows whose item the user viewed (pv) at or before that time. Samples of N rows
draw whole users in a seeded random order until N rows are reached. Days are Beijing days of
the data set's window (2017-11-25 to 2017-12-03). The targets were measured on the full data set
(totals, behaviour shares), on real one- to two-hour slices (item popularity) and on real
multi-day histories of sampled users (the rest). The whole file is read into memory (a peak of
about 275 bytes a row: 1.1 GB for 4M rows), which suits samples and slices, not the full file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mdaf_dist.config import SECONDS_PER_DAY, PrepareConfig
from mdaf_dist.data.ingest import BEHAVIORS, RawEvents, ingest

SAMPLE_ROWS = (1000, 2400, 5000, 10_000)
LAST_K = (1, 10, 50)

# statistic -> (the real data set's value, what it is)
TARGETS: Dict[str, Tuple[Optional[float | str], str]] = {
    "rows": (100_150_807, "rows"),
    "users": (987_994, "users"),
    "items": (4_162_024, "items"),
    "categories": (9_439, "categories"),
    "first_day": ("2017-11-25", "first day (Beijing time)"),
    "last_day": ("2017-12-03", "last day (Beijing time)"),
    **{f"categories_{n}": (c, f"categories in {n:,} rows") for n, c in zip(SAMPLE_ROWS, (190, 420, 710, 1100))},
    **{f"items_per_row_{n}": (0.76, f"items per row in {n:,} rows") for n in SAMPLE_ROWS},
    "items_clicked_once": (None, "share of items clicked once"),
    "top1pct_click_share": (0.055, "top 1% of items: share of clicks"),
    "zipf_exponent": (0.3, "Zipf exponent of item clicks"),
    "rows_per_user": (85, "rows per user (median)"),
    "active_days_per_user": (6.6, "active days per user"),
    "categories_per_user": (23, "categories per user"),
    **{f"category_in_last_{k}": (p, f"clicked category in the last {k}") for k, p in zip(LAST_K, (0.40, 0.62, 0.70))},
    "repeat_rate": (0.19, "repeat rate (item clicked before)"),
    "after_view": (0.20, "cart/fav/buy after a view of the item"),
    **{f"share_{b}": (s, f"behaviour share {b}") for b, s in zip(("pv", "cart", "fav", "buy"), (0.895, 0.055, 0.029, 0.020))},
}


def read_events(path: str) -> Tuple[RawEvents, int]:
    """The valid rows of `path` (any input `mdaf prepare` takes) and the number of rejected lines."""
    with tempfile.TemporaryDirectory() as tmp:
        events, report = ingest(path, PrepareConfig(max_bad_fraction=1.0), Path(tmp) / "rejects.csv", progress=False)
    return events, report.lines - report.valid


def _by_user_time(events: RawEvents) -> np.ndarray:
    return np.lexsort((np.arange(len(events)), events.ts, events.user))


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Per position of a sorted array: True where a new value starts."""
    return np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]


def _pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A dense id per distinct (a, b) pair (raw ids of any size fit)."""
    b_rank = np.unique(b, return_inverse=True)[1]
    wide = np.unique(a, return_inverse=True)[1].astype(np.int64) * (int(b_rank.max()) + 1) + b_rank
    return np.unique(wide, return_inverse=True)[1]


def _gap_to_previous(user_pos: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Per row: positions since the previous row of the same key (-1 for none); rows in user order."""
    order = np.lexsort((user_pos, key))
    gap = np.full(len(key), -1, dtype=np.int64)
    same = ~_runs(key[order])
    gap[order[same]] = user_pos[order][same] - user_pos[order][np.flatnonzero(same) - 1]
    return gap


def _sample_sizes(user: np.ndarray, category: np.ndarray, item: np.ndarray, seed: int) -> Dict[str, float]:
    """Categories and items per row in samples of SAMPLE_ROWS rows drawn by user (user-sorted rows)."""
    starts = np.flatnonzero(_runs(user))
    lengths = np.diff(np.append(starts, len(user)))
    order = np.random.default_rng(seed).permutation(len(starts))
    reached = np.cumsum(lengths[order])
    out: Dict[str, float] = {}
    for n in SAMPLE_ROWS:
        if reached[-1] < n:
            continue
        chosen = order[: int(np.searchsorted(reached, n)) + 1]
        rows = np.concatenate([np.arange(starts[u], starts[u] + lengths[u]) for u in chosen])
        out[f"categories_{n}"] = len(np.unique(category[rows]))
        out[f"items_per_row_{n}"] = len(np.unique(item[rows])) / len(rows)
    return out


def _popularity(item: np.ndarray) -> Dict[str, float]:
    clicks = np.sort(np.unique(item, return_counts=True)[1])[::-1]
    rank = np.arange(1, len(clicks) + 1)
    slope = np.polyfit(np.log(rank), np.log(clicks), 1)[0] if len(clicks) > 1 else float("nan")
    return {
        "items_clicked_once": float(np.mean(clicks == 1)),
        "top1pct_click_share": clicks[: max(1, len(clicks) // 100)].sum() / clicks.sum(),
        "zipf_exponent": -slope,
    }


def _sequences(user: np.ndarray, item: np.ndarray, category: np.ndarray) -> Dict[str, float]:
    """Category recency and item repeats over each user's clicks (user-sorted, time-ordered)."""
    starts = np.flatnonzero(_runs(user))
    pos = np.arange(len(user)) - np.repeat(starts, np.diff(np.append(starts, len(user))))
    category_gap = _gap_to_previous(pos, _pair_key(user, category))
    item_gap = _gap_to_previous(pos, _pair_key(user, item))
    later = pos > 0
    out = {f"category_in_last_{k}": float(np.mean((category_gap[later] > 0) & (category_gap[later] <= k))) for k in LAST_K}
    out["repeat_rate"] = float(np.mean(item_gap[later] > 0))
    return out


def _after_view(user: np.ndarray, item: np.ndarray, behavior: np.ndarray) -> float:
    """Share of cart/fav/buy rows with a pv of the same item by the same user at or before it."""
    key = _pair_key(user, item)
    pv = behavior == BEHAVIORS.index("pv")
    position = np.arange(len(key))
    # rows are in user-time order, so a key's smallest pv position is its first view
    first_pv = np.full(int(key.max()) + 1, len(key), dtype=np.int64)
    np.minimum.at(first_pv, key[pv], position[pv])
    other = ~pv
    return float(np.mean(first_pv[key[other]] <= position[other])) if other.any() else float("nan")


def compute(events: RawEvents, seed: int = 0) -> Dict[str, float | str]:
    """The statistics of TARGETS measured on `events` (any order)."""
    order = _by_user_time(events)
    user, item, category = events.user[order], events.item[order], events.category[order]
    behavior, ts = events.behavior[order], events.ts[order]
    day = (ts - PrepareConfig.window_start) // SECONDS_PER_DAY
    first_day, last_day = (np.datetime64("2017-11-25") + np.array([day.min(), day.max()])).astype(str).tolist()
    pv = behavior == BEHAVIORS.index("pv")
    starts = np.flatnonzero(_runs(user))
    out: Dict[str, float | str] = {
        "rows": len(user),
        "users": len(starts),
        "items": len(np.unique(item)),
        "categories": len(np.unique(category)),
        "first_day": first_day,
        "last_day": last_day,
        **_sample_sizes(user, category, item, seed),
        **_popularity(item[pv]),
        "rows_per_user": float(np.median(np.diff(np.append(starts, len(user))))),
        "active_days_per_user": len(np.unique(_pair_key(user, day))) / len(starts),
        "categories_per_user": len(np.unique(_pair_key(user, category))) / len(starts),
        **_sequences(user[pv], item[pv], category[pv]),
        "after_view": _after_view(user, item, behavior),
    }
    counts = np.bincount(behavior, minlength=len(BEHAVIORS))
    out.update({f"share_{b}": counts[BEHAVIORS.index(b)] / len(user) for b in ("pv", "cart", "fav", "buy")})
    return out


def table(stats: Dict[str, float | str], rejected: int = 0) -> str:
    """Each statistic beside its target, one per line."""
    lines: List[str] = [f"{'statistic':<40} {'this file':>14} {'real data set':>14}"]
    for key, (target, label) in TARGETS.items():
        value = stats.get(key)
        lines.append(f"{label:<40} {_fmt(value):>14} {_fmt(target):>14}")
    if rejected:
        lines.append(f"lines rejected by the ingest's checks and left out: {rejected:,}")
    return "\n".join(lines)


def _fmt(value: Optional[float | str]) -> str:
    if isinstance(value, str):
        return value
    if value is None or np.isnan(value):
        return "-"
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.3f}"
