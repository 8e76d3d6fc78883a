"""The paper's gate analysis (MDAF_paper.md 5.4 and appendix B) from per-sample predictions.

Table 4: order statistics of the gate. Table 5: mean gate by user activity (history items the
model saw: <10, 10-30, >30). Table B1: by the popularity of the target category. Table B2: by
the history length in the paper's finer groups. Every sample falls in exactly one row of Tables
5, B1 and B2, so each table's counts sum to the samples scored: B2 adds rows for empty and for
longer-than-50 histories when there are any (the paper's groups stop at 1 and 50).

Category popularity (B1), which the paper does not define: a category's number of samples in
the scored split; categories are ranked by it (ties by id), the top 20 % of categories are
"popular", the bottom 20 % "niche", the rest "mid-tier". The groups hold 20/60/20 % of the
categories, not of the samples.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from mdaf_dist.analysis.report import Table
from mdaf_dist.train.metrics import ACTIVITY_GROUPS, SEQUENCE_LENGTH_GROUPS, gate_statistics, in_group

# Table 4, in the paper's row order: (label, key of gate_statistics, paper's value)
PAPER_TABLE4 = (
    ("Mean", "gate_mean", 0.1766),
    ("Std", "gate_std", 0.0165),
    ("Median", "gate_median", 0.1744),
    ("Min", "gate_min", 0.1053),
    ("Max", "gate_max", 0.2561),
    ("25th percentile", "gate_p25", 0.1658),
    ("75th percentile", "gate_p75", 0.1884),
)
# Table 5: label, samples, mean gate; in the order of ACTIVITY_GROUPS
PAPER_TABLE5 = (
    ("Low activity (<10 hist items)", 24_385, 0.1712),
    ("Medium activity (10-30 hist items)", 58_946, 0.1778),
    ("High activity (>30 hist items)", 18_278, 0.1834),
)
# Table B1: label, samples, mean gate, std gate
POPULAR_SHARE = 0.2
PAPER_TABLEB1 = (
    ("Popular categories (top 20%)", 42_851, 0.1698, 0.0152),
    ("Mid-tier categories", 38_964, 0.1776, 0.0164),
    ("Niche categories (bottom 20%)", 19_794, 0.1852, 0.0182),
)
# Table B2: label, samples, mean gate; in the order of SEQUENCE_LENGTH_GROUPS
PAPER_TABLEB2 = (
    ("Very short (1-5 items)", 8_412, 0.1589),
    ("Short (6-15 items)", 28_973, 0.1724),
    ("Medium (16-35 items)", 41_288, 0.1793),
    ("Long (36-50 items)", 22_936, 0.1867),
)


def _mean_std(gates: np.ndarray) -> Tuple[float, float]:
    return (float(gates.mean()), float(gates.std())) if len(gates) else (math.nan, math.nan)


def table4(gates: np.ndarray) -> Table:
    stats = gate_statistics(gates)
    rows = [[label, stats[key], paper] for label, key, paper in PAPER_TABLE4]
    return Table("table4", "Table 4: gate value statistics", ["Statistic", "Ours", "Paper"], rows,
                 f"{len(gates):,} samples; population std; percentiles by linear interpolation.")  # fmt: skip


def table5(gates: np.ndarray, hist_len: np.ndarray) -> Table:
    rows = []
    for (label, paper_count, paper_mean), (low, high) in zip(PAPER_TABLE5, ACTIVITY_GROUPS):
        inside = in_group(hist_len, low, high)
        rows.append([label, int(inside.sum()), _mean_std(gates[inside])[0], paper_count, paper_mean])
    return Table("table5", "Table 5: gate values by user activity level",
                 ["User Group", "Sample Count", "Mean Gate", "Paper Sample Count", "Paper Mean Gate"], rows,
                 "Activity = history items the model saw (at most model.history_length).")  # fmt: skip


def category_groups(category: np.ndarray) -> np.ndarray:
    """Group per sample: 0 popular (top 20 % of categories by samples), 1 mid-tier, 2 niche."""
    ids, inverse, counts = np.unique(category, return_inverse=True, return_counts=True)
    n = len(ids)
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((ids, -counts))] = np.arange(n)  # 0 = most samples, ties by id
    group = np.ones(n, dtype=np.int8)
    group[rank < math.ceil(POPULAR_SHARE * n)] = 0
    group[rank >= n - math.floor(POPULAR_SHARE * n)] = 2
    return group[inverse]


def tableB1(gates: np.ndarray, category: np.ndarray) -> Table:
    groups = category_groups(category)
    rows = []
    for code, (label, paper_count, paper_mean, paper_std) in enumerate(PAPER_TABLEB1):
        inside = groups == code
        mean, std = _mean_std(gates[inside])
        rows.append([label, int(inside.sum()), mean, std, paper_count, paper_mean, paper_std])
    categories = len(np.unique(category))
    return Table("tableB1", "Table B1: gate values by target category popularity",
                 ["Category Group", "Sample Count", "Mean Gate", "Std Gate", "Paper Sample Count", "Paper Mean Gate", "Paper Std Gate"], rows,
                 f"{categories:,} categories ranked by their samples in this split; top/bottom 20 % of categories.")  # fmt: skip


def tableB2(gates: np.ndarray, hist_len: np.ndarray) -> Table:
    longest = SEQUENCE_LENGTH_GROUPS[-1][1]
    groups = [("Empty (0 items)", None, None, (0, 0))]
    groups += [(*paper, bounds) for paper, bounds in zip(PAPER_TABLEB2, SEQUENCE_LENGTH_GROUPS)]
    groups += [(f"Longer (>{longest} items)", None, None, (longest + 1, None))]
    rows: List[list] = []
    for label, paper_count, paper_mean, (low, high) in groups:
        inside = in_group(hist_len, low, high)
        if paper_count is not None or inside.any():
            rows.append([label, int(inside.sum()), _mean_std(gates[inside])[0], paper_count, paper_mean])
    return Table("tableB2", "Table B2: gate values by sequence length (actual, non-padded)",
                 ["Sequence Length", "Sample Count", "Mean Gate", "Paper Sample Count", "Paper Mean Gate"], rows)  # fmt: skip


def gate_tables(gates: np.ndarray, hist_len: np.ndarray, category: np.ndarray) -> List[Table]:
    gates = np.asarray(gates, dtype=np.float64)
    return [table4(gates), table5(gates, hist_len), tableB1(gates, category), tableB2(gates, hist_len)]
