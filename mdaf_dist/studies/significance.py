"""Whether a report row differs from its reference by more than chance (DESIGN 8).

Over seeds: the per-seed paired differences (mean ± sample std) and a paired t-test
(scipy.stats.ttest_rel). One seed: the DeLong test of two correlated AUCs on the same samples
(the common evaluation set), with DeLong's covariance computed the fast way of Sun & Xu (2014,
"Fast implementation of DeLong's algorithm for comparing the areas under correlated receiver
operating characteristic curves"): midranks instead of the O(m n) pairwise comparisons.
The paper marks p < 0.01 (Table 2's footnote); so do the reports.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

SIGNIFICANT = 0.01


@dataclass
class Comparison:
    """A row against its reference: the paired AUC differences and the test's p-value."""

    deltas: list
    test: str  # "paired t-test" (seeds), "DeLong" (one seed, common set), "" (no test possible)
    p_value: Optional[float] = None

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.deltas) if self.deltas else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.deltas) if len(self.deltas) > 1 else None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANT


def paired_t_test(ours: Sequence[float], reference: Sequence[float]) -> Optional[float]:
    """Two-sided p of the paired t-test over seeds; None with fewer than two pairs or when every
    pair differs by the same amount (no variance to test against)."""
    differences = np.subtract(ours, reference)
    # equal differences up to rounding (0.7 - 0.6 vs 0.6 - 0.5) would give p = 0
    if len(differences) < 2 or np.ptp(differences) <= 1e-12:
        return None
    return float(stats.ttest_rel(ours, reference).pvalue)


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC per row of `scores`, their covariance) by Sun & Xu's algorithm: for k score rows
    over m positives and n negatives, O(k (m + n) log(m + n))."""
    labels = np.asarray(labels).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positives, negatives = scores[:, labels], scores[:, ~labels]
    m, n = positives.shape[1], negatives.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong needs both positive and negative samples")
    # midranks within the positives, within the negatives, and over both
    rank_pos = stats.rankdata(positives, axis=1)
    rank_neg = stats.rankdata(negatives, axis=1)
    rank_all = stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    auc = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    # structural components: V10 per positive, V01 per negative
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, covariance


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Two-sided p that two models' AUCs on the same samples are equal (DeLong et al. 1988)."""
    auc, cov = delong_covariance(labels, np.vstack([scores_a, scores_b]))
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if variance <= 0:
        return 1.0 if auc[0] == auc[1] else 0.0
    z = (auc[0] - auc[1]) / np.sqrt(variance)
    return float(2 * stats.norm.sf(abs(z)))


def compare(ours: dict, reference: dict, same_samples: Optional[tuple] = None) -> Comparison:
    """A row's AUC per seed against its reference's: the differences of the seeds both have, a
    paired t-test when there are two or more, else the DeLong test of `same_samples` (labels,
    ours' scores, the reference's scores on the common set) when given."""
    seeds = [seed for seed in ours if seed in reference]
    deltas = [ours[seed] - reference[seed] for seed in seeds]
    if len(seeds) > 1:
        return Comparison(deltas, "paired t-test", paired_t_test([ours[s] for s in seeds], [reference[s] for s in seeds]))
    if len(seeds) == 1 and same_samples is not None:
        return Comparison(deltas, "DeLong", delong_test(*same_samples))
    return Comparison(deltas, "")
