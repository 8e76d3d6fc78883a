"""Exact AUC / logloss / GAUC / calibration against scikit-learn and plain loops, on one process
and gathered over 2 gloo ranks (onto every rank, or onto rank 0 only for the train AUC); an
Evaluator keeps only the columns given and resumes from its state_dict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from mdaf_dist.train import metrics
from mdaf_dist.train.metrics import Evaluator, calibration, exact_auc, gate_statistics, gauc, logloss_from_logits
from tests.distributed import run_ranks

# rank r holds RANK_SIZES[r] validation samples: unequal on purpose
RANK_SIZES = (173, 410)


def _predictions(n: int, seed: int):
    """Logits rounded to one decimal so that many scores tie, labels, gates, history lengths and
    users (some with a single sample, so of one class)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    logits = np.round(rng.normal(0.8 * labels - 0.4, 1.0), 1).astype(np.float32)
    gates = rng.random(n).astype(np.float32)
    hist_len = rng.integers(0, 51, n)
    users = rng.integers(1, n // 6 + 2, n)
    return logits, labels.astype(np.float32), gates, hist_len, users


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _feed(evaluator: Evaluator, logits, labels, gates=None, hist_len=None, users=None, batch: int = 64) -> None:
    def part_of(values, part):
        return None if values is None else torch.from_numpy(values[part])

    for start in range(0, len(logits), batch):
        part = slice(start, start + batch)
        evaluator.update(
            torch.from_numpy(logits[part]), torch.from_numpy(labels[part]),
            part_of(gates, part), part_of(hist_len, part), part_of(users, part),
        )  # fmt: skip


def _gauc_by_loop(logits, labels, users):
    """GAUC the plain way: scikit-learn's AUC user by user, weighted by the user's samples."""
    total = weight = skipped = 0
    for user in np.unique(users):
        mine = users == user
        if len(np.unique(labels[mine])) < 2:
            skipped += 1
            continue
        total += mine.sum() * roc_auc_score(labels[mine], logits[mine])
        weight += mine.sum()
    return total / weight, skipped


@pytest.mark.parametrize("block", [7, metrics.AUC_BLOCK])
def test_exact_auc_matches_sklearn_with_many_ties(block, monkeypatch):
    """Also summed in blocks far smaller than a group of tied scores (each block then ends with
    its last group), for float32 and float64 scores."""
    monkeypatch.setattr(metrics, "AUC_BLOCK", block)
    logits, labels, *_ = _predictions(5000, seed=1)
    assert len(np.unique(logits)) < 200
    assert exact_auc(logits, labels) == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)
    assert exact_auc(logits.astype(np.float64), labels) == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)


def test_exact_auc_counts_a_tie_between_classes_as_half():
    # positive 0.4 beats 0.1 and ties the negative 0.4; positive 0.8 beats both: (1 + 0.5 + 2) / 4
    assert exact_auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1])) == 0.875
    assert exact_auc(np.full(6, 0.3), np.array([0, 1, 0, 1, 1, 0])) == 0.5


def test_exact_auc_is_nan_for_a_single_class_and_rejects_soft_labels():
    assert math.isnan(exact_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        exact_auc(np.array([0.1, 0.2]), np.array([0.0, 0.99]))


def test_logloss_matches_sklearn_and_is_stable_for_extreme_logits():
    logits, labels, *_ = _predictions(5000, seed=2)
    expected = log_loss(labels, _sigmoid(logits))
    assert logloss_from_logits(logits, labels) == pytest.approx(expected, abs=1e-6)
    # float32 sigmoid saturates at these logits; the float64 log1p form does not
    assert logloss_from_logits(np.array([200.0, -200.0]), np.array([1.0, 0.0])) == pytest.approx(0.0, abs=1e-12)
    assert logloss_from_logits(np.array([200.0, -200.0]), np.array([0.0, 1.0])) == pytest.approx(200.0)


def test_gate_statistics_by_hand():
    gates = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.5])
    hist_len = np.array([0, 3, 5, 10, 50, 60])
    stats = gate_statistics(gates, hist_len)
    assert stats["gate_mean"] == pytest.approx(0.4)
    assert stats["gate_std"] == pytest.approx(np.sqrt(np.mean((gates - 0.4) ** 2)))
    assert stats["gate_median"] == pytest.approx(0.35)
    assert (stats["gate_min"], stats["gate_max"]) == (0.1, 0.9)
    assert stats["gate_p25"] == pytest.approx(0.225)
    assert stats["gate_p75"] == pytest.approx(0.475)
    # Table 5's activity groups: <10, 10-30, >30 history items
    assert stats["gate_by_hist_len"] == pytest.approx({"0-9": 0.2, "10-30": 0.4, "31+": 0.7})


def test_gauc_matches_a_per_user_loop_and_counts_one_class_users():
    logits, labels, _, _, users = _predictions(3000, seed=5)
    expected, skipped = _gauc_by_loop(logits, labels, users)
    result = gauc(logits, labels, users)
    assert skipped > 0 and result["gauc_users_skipped"] == skipped
    assert result["gauc_users"] + skipped == len(np.unique(users))
    assert result["gauc"] == pytest.approx(expected, abs=1e-12)
    # one user with every sample is the plain AUC
    assert gauc(logits, labels, np.ones_like(users))["gauc"] == pytest.approx(exact_auc(logits, labels), abs=1e-12)


def test_calibration_is_mean_prediction_over_positive_rate():
    logits, labels, *_ = _predictions(1000, seed=6)
    result = calibration(logits, labels)
    assert result["mean_prediction"] == pytest.approx(_sigmoid(logits).mean(), abs=1e-12)
    assert result["calibration"] == pytest.approx(_sigmoid(logits).mean() / labels.astype(np.float64).mean(), abs=1e-12)


def test_evaluator_single_process_matches_sklearn():
    logits, labels, gates, hist_len, users = _predictions(700, seed=3)
    evaluator = Evaluator()
    _feed(evaluator, logits, labels, gates, hist_len, users)
    result = evaluator.compute()
    assert result["num_samples"] == 700
    assert result["positive_rate"] == pytest.approx(labels.mean())
    assert result["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)
    assert result["logloss"] == pytest.approx(log_loss(labels, _sigmoid(logits)), abs=1e-6)
    assert result["gate_mean"] == pytest.approx(gates.astype(np.float64).mean())
    assert result["gauc"] == pytest.approx(_gauc_by_loop(logits, labels, users)[0], abs=1e-12)
    assert result["calibration"] == pytest.approx(_sigmoid(logits).mean() / labels.astype(np.float64).mean(), abs=1e-12)
    assert set(result["gate_by_hist_len"]) == {"0-9", "10-30", "31+"}
    np.testing.assert_array_equal(evaluator.gates, gates.astype(np.float64))

    evaluator.reset()
    _feed(evaluator, logits[:100], labels[:100])
    result = evaluator.compute()
    assert result["num_samples"] == 100
    assert "gate_mean" not in result and "gauc" not in result and evaluator.gates is None


def test_evaluator_rejects_gates_for_only_some_batches():
    logits, labels, gates, *_ = _predictions(10, seed=4)
    evaluator = Evaluator()
    evaluator.update(torch.from_numpy(logits[:5]), torch.from_numpy(labels[:5]), torch.from_numpy(gates[:5]))
    evaluator.update(torch.from_numpy(logits[5:]), torch.from_numpy(labels[5:]))
    with pytest.raises(ValueError, match="gate was given for some batches but not for others"):
        evaluator.compute()


def test_evaluator_keeps_only_the_columns_given_and_resumes_from_its_state_dict():
    """Logits and labels alone (the train AUC) are 5 bytes a sample; a state_dict saved halfway and
    loaded into a fresh Evaluator gives the metrics of an uninterrupted pass."""
    logits, labels, *_ = _predictions(700, seed=7)
    whole = Evaluator()
    _feed(whole, logits, labels)
    halfway = Evaluator()
    _feed(halfway, logits[:300], labels[:300])
    state = halfway.state_dict()
    assert {name: (column.dtype, column.numel()) for name, column in state.items()} == {"logits": (torch.float32, 300), "labels": (torch.uint8, 300)}
    resumed = Evaluator()
    resumed.load_state_dict(state)
    _feed(resumed, logits[300:], labels[300:])
    assert len(resumed) == 700
    assert resumed.compute() == whole.compute()
    assert resumed.auc() == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)


def test_evaluator_rejects_soft_labels_before_storing_them_as_uint8():
    evaluator = Evaluator()
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        evaluator.update(torch.zeros(2), torch.tensor([0.0, 0.99]))
    assert len(evaluator) == 0


def test_evaluator_rejects_a_gate_of_the_wrong_length():
    with pytest.raises(ValueError, match="gate has 3 values for 4 logits"):
        Evaluator().update(torch.zeros(4), torch.zeros(4), gate=torch.zeros(3))


def _evaluate_on_rank():
    """Each rank's own slice of the validation set; also a pass in which rank 1 has no samples."""
    rank = torch.distributed.get_rank()
    evaluator = Evaluator()
    _feed(evaluator, *_predictions(RANK_SIZES[rank], seed=10 + rank))
    full = evaluator.compute()
    gates = evaluator.gates
    evaluator.reset()
    if rank == 0:
        _feed(evaluator, *_predictions(RANK_SIZES[rank], seed=10 + rank))
    only_rank0 = evaluator.compute()
    # the train AUC's path: logits and labels gathered on rank 0 only, the value broadcast
    evaluator.reset()
    _feed(evaluator, *_predictions(RANK_SIZES[rank], seed=10 + rank)[:2])
    return full, gates, only_rank0, evaluator.auc(root=0)


def test_evaluator_gathers_unequal_ranks_exactly():
    rank0, rank1 = run_ranks(2, _evaluate_on_rank)
    per_rank = [_predictions(n, seed=10 + rank) for rank, n in enumerate(RANK_SIZES)]
    logits, labels, gates, hist_len, users = (np.concatenate(column) for column in zip(*per_rank))

    full, gathered_gates, only_rank0, auc_on_rank0 = rank0
    assert rank1[0] == full and rank1[2] == only_rank0
    assert auc_on_rank0 == rank1[3] == full["auc"]
    np.testing.assert_array_equal(rank1[1], gathered_gates)
    assert full["num_samples"] == sum(RANK_SIZES)
    assert full["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-6)
    assert full["logloss"] == pytest.approx(log_loss(labels, _sigmoid(logits)), abs=1e-6)
    np.testing.assert_array_equal(gathered_gates, gates.astype(np.float64))
    assert full["gate_by_hist_len"] == pytest.approx(gate_statistics(gates, hist_len)["gate_by_hist_len"])
    assert full["gauc"] == pytest.approx(_gauc_by_loop(logits, labels, users)[0], abs=1e-12)

    n0 = RANK_SIZES[0]
    assert only_rank0["num_samples"] == n0
    assert only_rank0["auc"] == pytest.approx(roc_auc_score(labels[:n0], logits[:n0]), abs=1e-6)
