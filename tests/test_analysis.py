"""`mdaf predict` and `mdaf analyze` on a tiny trained run with a test split: the predictions
reproduce the trainer's metrics (scikit-learn and a plain per-user loop), 1 and 2 ranks write the
same rows, another prepared directory scores through the training vocabulary, and the paper's
tables come out with their row labels and counts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mdaf_dist.analysis.analyze import evaluations_of
from mdaf_dist.analysis.dynamics import PAPER_TABLE7
from mdaf_dist.analysis.gate_tables import PAPER_TABLE4, PAPER_TABLE5, PAPER_TABLEB1, PAPER_TABLEB2, gate_tables
from mdaf_dist.analysis.predict import predict, prediction_metadata, read_predictions, resolve_checkpoint
from mdaf_dist.cli import main
from mdaf_dist.config import PrepareConfig
from mdaf_dist.data.layout import read_meta
from mdaf_dist.data.prepare import prepare
from mdaf_dist.data.vocab import load_vocab
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import distributed
from mdaf_dist.train.trainer import RESULTS_FILE, Trainer
from tests.distributed import prepare_tiny_data, run_ranks, tiny_config

METRIC_KEYS = {"auc", "logloss", "gauc", "calibration", "positive_rate", "num_samples"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of a tiny MDAF on data with validation and test days; (run dir, results)."""
    root = tmp_path_factory.mktemp("analysis")
    data = prepare_tiny_data(root, test_days=1)
    cfg = tiny_config(data, root / "run", "train.max_epochs=2", "train.patience=0", "loader.batch_size=64")
    with distributed("cpu") as env:
        results = Trainer(cfg, env).fit()
    return root / "run", results


def _columns(path):
    table = read_predictions(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _gauc_by_loop(logits, labels, users):
    total = weight = 0.0
    for user in np.unique(users):
        mine = users == user
        if len(np.unique(labels[mine])) == 2:
            total += mine.sum() * roc_auc_score(labels[mine], logits[mine])
            weight += mine.sum()
    return total / weight


def test_results_have_train_auc_per_epoch_and_test_metrics(trained):
    run, results = trained
    assert json.loads((run / RESULTS_FILE).read_text())["test"]["auc"] == results["test"]["auc"]
    assert METRIC_KEYS <= set(results["valid"]) and METRIC_KEYS <= set(results["test"])
    assert [e["epoch"] for e in results["evaluations"]] == [1, 2]
    assert all(0.0 <= e["train_auc"] <= 1.0 for e in results["evaluations"])
    assert results["test"]["num_samples"] == read_meta(run.parent / "data")["splits"]["test"]["rows"]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_predictions_reproduce_the_trainers_metrics(trained, tmp_path, capsys, split):
    run, results = trained
    out = tmp_path / "preds.parquet"
    assert main(["predict", "--checkpoint", str(run / "checkpoints"), "--split", split, "--out", str(out)]) == 0
    assert f"{results[split]['num_samples']} {split} predictions -> {out}" in capsys.readouterr().out
    c = _columns(out)
    labels, logits = c["label"].astype(np.float64), c["logit"].astype(np.float64)
    assert len(labels) == results[split]["num_samples"]
    assert roc_auc_score(labels, logits) == pytest.approx(results[split]["auc"], abs=1e-9)
    assert log_loss(labels, _sigmoid(logits)) == pytest.approx(results[split]["logloss"], abs=1e-9)
    assert _gauc_by_loop(logits, labels, c["user"]) == pytest.approx(results[split]["gauc"], abs=1e-9)
    assert c["probability"] == pytest.approx(_sigmoid(logits), abs=1e-6)
    assert ((0 <= c["gate"]) & (c["gate"] <= 1)).all() and (c["hist_len"] >= 1).all() and (c["hist_len"] <= 8).all()
    # the last day of 9 is test, the one before validation
    assert set(c["day"].tolist()) == {8 if split == "test" else 7}


def _predict_on_rank(checkpoint, out):
    with distributed("cpu") as env:
        return predict(env, resolve_checkpoint(checkpoint), out)


def test_one_and_two_ranks_write_the_same_rows(trained, tmp_path):
    run, _ = trained
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    run_ranks(1, _predict_on_rank, str(run / "checkpoints"), str(one))
    meta = run_ranks(2, _predict_on_rank, str(run / "checkpoints"), str(two))
    assert meta[0] == meta[1] and meta[0]["world_size"] == 2
    assert sorted(p.name for p in two.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    a, b = _columns(one), _columns(two)
    for name in ("user", "item", "category", "label", "hist_len", "ts"):
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_allclose(a["logit"], b["logit"], atol=1e-6)
    np.testing.assert_allclose(a["gate"], b["gate"], atol=1e-6)


def test_another_prepared_directory_scores_unseen_ids_as_padding(trained, tmp_path):
    run, _ = trained
    # the training rows, a third of them with items and users the training data never had
    rows = [line.split(",") for line in (run.parent / "raw.csv").read_text().splitlines()]
    for k, row in enumerate(rows):
        if k % 3 == 0:
            row[1] = str(int(row[1]) + 10**6)
        if k % 7 == 0:
            row[0] = str(int(row[0]) + 10**6)
    (tmp_path / "other.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    other = tmp_path / "other"
    prepare(PrepareConfig(input=str(tmp_path / "other.csv"), out=str(other)), 8, progress=False)
    out = tmp_path / "other.parquet"
    assert main(["predict", "--checkpoint", str(run / "checkpoints"), "--data", str(other), "--out", str(out)]) == 0
    c, meta = _columns(out), prediction_metadata(out)
    training = run.parent / "data"
    expected = {name: int((~np.isin(c[name], np.asarray(load_vocab(training, name))[1:])).sum()) for name in ("user", "item", "category")}
    unseen = meta["unseen_ids"]
    assert {name: unseen[name] for name in expected} == expected
    assert 0 < expected["item"] < len(c["item"]) and 0 < expected["user"] < len(c["user"]) and unseen["hist_item"] > 0
    assert meta["data_dir"] == str(other) and len(c["label"]) == read_meta(other)["splits"]["valid"]["rows"]


def test_analyze_writes_the_papers_tables_and_plots(trained, capsys):
    run, results = trained
    assert main(["analyze", "--checkpoint", str(run / "checkpoints")]) == 0
    printed = capsys.readouterr().out
    out = run / "analysis"
    tables = json.loads((out / "tables.json").read_text())
    n = results["valid"]["num_samples"]
    assert [r["Statistic"] for r in tables["table4"]["rows"]] == [label for label, *_ in PAPER_TABLE4]
    assert tables["table4"]["rows"][0]["Ours"] == pytest.approx(results["valid"]["gate_mean"], abs=1e-6)
    for key, paper, label in (("table5", PAPER_TABLE5, "User Group"), ("tableB1", PAPER_TABLEB1, "Category Group"), ("tableB2", PAPER_TABLEB2, "Sequence Length")):
        rows = tables[key]["rows"]
        assert [r[label] for r in rows][: len(paper)] == [p[0] for p in paper]
        assert [r["Paper Sample Count"] for r in rows][: len(paper)] == [p[1] for p in paper]
        assert sum(r["Sample Count"] for r in rows) == n
    epochs = tables["table7"]["rows"]
    assert [r["Epoch"] for r in epochs] == sorted(PAPER_TABLE7)
    assert [r["Train AUC"] for r in epochs[:2]] == [e["train_auc"] for e in results["evaluations"]]
    assert "### Table B2: gate values by sequence length" in printed and (out / "tables.md").read_text() in printed
    for png in ("gate_histogram.png", "gate_by_history_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 1000


def test_analyze_from_predictions_of_the_best_checkpoint(trained, tmp_path, capsys):
    run, results = trained
    preds = tmp_path / "p.parquet"
    assert main(["predict", "--checkpoint", str(run / "checkpoints"), "--best", "--out", str(preds)]) == 0
    assert prediction_metadata(preds)["step"] == results["best_step"]
    assert main(["analyze", "--predictions", str(preds), "--results", str(run / RESULTS_FILE), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    ours = json.loads((tmp_path / "a" / "tables.json").read_text())
    assert set(ours) == {"metrics", "table4", "table5", "tableB1", "tableB2", "table7"}
    assert pq.read_schema(next(preds.iterdir())).metadata[b"mdaf"]


def test_table7_of_an_earlier_checkpoint_covers_the_whole_run(trained):
    """The best checkpoint only knows the epochs up to itself: Table 7 reads the run's results."""
    run, results = trained
    first = sorted((run / "checkpoints").glob("step_*"))[0]
    assert len(ckpt.read_trainer_state(first)["evaluations"]) < len(results["evaluations"])
    assert evaluations_of(first, None) == results["evaluations"]


def _error(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip()


def test_bad_input_is_one_line(trained, tiny_data_dir, tmp_path, capsys):
    run, _ = trained
    checkpoints = str(run / "checkpoints")
    assert _error(capsys, ["predict", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "p.parquet")]) == (
        f"mdaf predict: error: no checkpoint at {tmp_path} (expected a step_* directory with trainer.json, or a folder of them)"
    )
    assert _error(capsys, ["predict", "--checkpoint", str(tmp_path / "nope"), "--out", "p.parquet"]) == (
        f"mdaf predict: error: no checkpoint at {tmp_path / 'nope'}: the path does not exist"
    )
    assert _error(capsys, ["predict", "--checkpoint", checkpoints, "--out", str(tmp_path / "missing" / "p.parquet")]) == (
        f"mdaf predict: error: cannot write {tmp_path / 'missing' / 'p.parquet'}: the directory {tmp_path / 'missing'} does not exist"
    )
    assert _error(capsys, ["predict", "--checkpoint", checkpoints, "--data", str(tiny_data_dir), "--split", "test", "--out", str(tmp_path / "p.parquet")]) == (
        f"mdaf predict: error: {tiny_data_dir} has no test samples (splits with samples: train, valid; "
        "a test split comes from prepare.test_days or prepare.split=fraction)"
    )
    assert _error(capsys, ["analyze", "--predictions", str(tmp_path / "none.parquet")]) == (
        f"mdaf analyze: error: no predictions at {tmp_path / 'none.parquet'} (expected a directory of part-*.parquet written by `mdaf predict`)"
    )


def test_gate_tables_by_hand():
    # 5 categories with 50, 40, 30, 20, 10 samples: the top one is popular, the bottom one niche
    category = np.repeat([7, 3, 9, 1, 5], [50, 40, 30, 20, 10])
    gates = np.where(category == 7, 0.1, np.where(category == 5, 0.3, 0.2))
    hist_len = np.resize([0, 3, 9, 10, 30, 31, 50, 60], len(category))
    t4, t5, b1, b2 = gate_tables(gates, hist_len, category)
    assert t4.rows[0][1] == pytest.approx(gates.mean()) and t4.rows[3][1] == 0.1 and t4.rows[4][1] == 0.3
    assert [(r[1], r[2]) for r in b1.rows] == [(50, pytest.approx(0.1)), (90, pytest.approx(0.2)), (10, pytest.approx(0.3))]
    assert [r[1] for r in t5.rows] == [(hist_len < 10).sum(), ((hist_len >= 10) & (hist_len <= 30)).sum(), (hist_len > 30).sum()]
    # B2 adds the empty and the longer-than-50 histories so that its counts cover every sample
    assert [r[0] for r in b2.rows] == ["Empty (0 items)"] + [p[0] for p in PAPER_TABLEB2] + ["Longer (>50 items)"]
    # 150 samples cycle through 8 lengths: 19 each of the first six, 18 of the last two
    assert [r[1] for r in b2.rows] == [19, 19, 19 + 19, 19 + 19, 18, 18] and sum(r[1] for r in b2.rows) == len(category)


def test_help_lists_the_analysis_commands(capsys):
    assert main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert {"predict", "analyze", "profile"} <= set(listed)
