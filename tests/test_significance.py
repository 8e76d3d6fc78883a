"""The studies' significance tests against references written out here: the paired t-test's
formula, and DeLong's covariance computed the slow way (every positive against every negative)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from mdaf_dist.studies.significance import compare, delong_covariance, delong_test, paired_t_test


def _slow_delong(labels, scores):
    """DeLong et al. (1988) as written: the kernel psi over all m x n pairs."""
    labels = np.asarray(labels).astype(bool)
    aucs, v10s, v01s = [], [], []
    for row in scores:
        pos, neg = row[labels], row[~labels]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    m, n = len(v10s[0]), len(v01s[0])
    k = len(scores)
    s10 = np.array([[np.sum((v10s[i] - aucs[i]) * (v10s[j] - aucs[j])) / (m - 1) for j in range(k)] for i in range(k)])
    s01 = np.array([[np.sum((v01s[i] - aucs[i]) * (v01s[j] - aucs[j])) / (n - 1) for j in range(k)] for i in range(k)])
    return np.array(aucs), s10 / m + s01 / n


def _fixed_scores():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.4
    a = labels * 0.8 + rng.normal(size=300)
    # b: correlated with a, coarser (ties within and across classes)
    b = np.round(a + rng.normal(scale=0.8, size=300), 1)
    return labels, a, b


def test_fast_delong_equals_the_pairwise_definition():
    labels, a, b = _fixed_scores()
    auc, cov = delong_covariance(labels, np.vstack([a, b]))
    slow_auc, slow_cov = _slow_delong(labels, [a, b])
    assert auc == pytest.approx(slow_auc, abs=1e-12)
    assert cov == pytest.approx(slow_cov, abs=1e-12)
    z = (slow_auc[0] - slow_auc[1]) / math.sqrt(slow_cov[0, 0] + slow_cov[1, 1] - 2 * slow_cov[0, 1])
    p = delong_test(labels, a, b)
    assert p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert 0.0 < p < 1.0
    assert delong_test(labels, a, a) == 1.0


def test_paired_t_test_equals_its_formula_and_needs_two_seeds():
    ours, ref = [0.61, 0.62, 0.605], [0.60, 0.603, 0.601]
    d = [o - r for o, r in zip(ours, ref)]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert paired_t_test(ours, ref) == pytest.approx(2 * stats.t.sf(abs(t), df=2), rel=1e-9)
    assert paired_t_test([0.6], [0.5]) is None
    assert paired_t_test([0.6, 0.7], [0.5, 0.6]) is None  # the same difference twice: no variance


def test_compare_pairs_seeds_and_falls_back_to_delong_for_one_seed():
    over_seeds = compare({1: 0.61, 2: 0.62, 3: 0.605, 9: 0.7}, {1: 0.60, 2: 0.603, 3: 0.601})
    assert over_seeds.test == "paired t-test" and len(over_seeds.deltas) == 3
    assert over_seeds.mean == pytest.approx(statistics.fmean([0.01, 0.017, 0.004]))
    assert over_seeds.std == pytest.approx(statistics.stdev([0.01, 0.017, 0.004]))
    labels, a, b = _fixed_scores()
    one = compare({1: 0.7}, {1: 0.6}, (labels, a, b))
    assert one.test == "DeLong" and one.p_value == delong_test(labels, a, b) and one.std is None
    assert compare({1: 0.7}, {1: 0.6}).p_value is None
