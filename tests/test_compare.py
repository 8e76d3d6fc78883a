"""`mdaf compare`: one table of metrics, differing settings and wall time across runs and studies."""

import json

from mdaf_dist import cli


def _run(path, auc, fusion, seconds, lr=0.0005, in_checkpoint=False):
    path.mkdir(parents=True)
    results = {"valid": {"auc": auc, "logloss": 0.65}, "best_auc": auc, "best_epoch": 2, "steps": 40, "wall_seconds": seconds, "samples_per_sec": 1234.4}
    (path / "results.json").write_text(json.dumps(results))
    config = f"output_dir: {path}\ndata_dir: /data/{fusion}\nmodel:\n  fusion: {fusion}\n  embedding_dim: 8\ntrain:\n  lr: {lr}\n"
    where = path / "checkpoints" / "step_00000040" if in_checkpoint else path
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.yaml").write_text(config)


def test_compare_runs_and_a_study_in_one_markdown_table(tmp_path, capsys):
    _run(tmp_path / "gate", 0.61234, "gate", 12.34, in_checkpoint=True)
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"name": "s", "cells": [{"id": "concat_seed-1"}, {"id": "fixed_seed-1"}]}))
    _run(study / "cells" / "concat_seed-1", 0.6, "concat", 10.0, lr=0.001)
    (study / "cells" / "fixed_seed-1").mkdir(parents=True)  # failed before it wrote anything
    assert cli.main(["compare", str(tmp_path / "gate"), str(study)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| run | auc | logloss | best_auc | best_epoch | steps | wall_s | samples/s | model.fusion | train.lr |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| gate | 0.6123 | 0.6500 | 0.6123 | 2 | 40 | 12.3 | 1,234 | gate | 0.0005 |",
        "| study/concat_seed-1 | 0.6000 | 0.6500 | 0.6000 | 2 | 40 | 10.0 | 1,234 | concat | 0.001 |",
        "| study/fixed_seed-1 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |  |  |",
    ]


def test_compare_as_csv(tmp_path, capsys):
    _run(tmp_path / "a", 0.6, "gate", 1.0)
    _run(tmp_path / "b", 0.7, "concat", 2.0)
    assert cli.main(["compare", "--format", "csv", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run,auc,logloss,best_auc,best_epoch,steps,wall_s,samples/s,model.fusion",
        "a,0.6000,0.6500,0.6000,2,40,1.0,\"1,234\",gate",
        "b,0.7000,0.6500,0.7000,2,40,2.0,\"1,234\",concat",
    ]


def test_compare_refuses_a_directory_that_is_no_run_in_one_line(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"mdaf compare: error: {tmp_path} is neither a training run (no results.json) nor a study directory (no study.json)\n"
    )
