"""`mdaf study run` and `mdaf study report` end to end on tiny synthetic data, through TorchX's
local scheduler: a 2 x 2 study (two fusions x two seeds, 2 ranks) stopped after its first cell
and run again; a filter study whose cells prepare different data, one of them failing."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import matplotlib.image
import pytest

from mdaf_dist import cli
from mdaf_dist.studies.workdir import StudyDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = "configs: [configs/paper.yaml, configs/studies/tiny/base_config.yaml]\nsynth: {rows: 4000, seed: 3}\n"

FUSIONS = TINY + """name: fusions
title: two fusions x two seeds
overrides: [train.max_epochs=1, logging.tensorboard=true]
axes:
  - {name: Fusion, key: model.fusion, values: [gate, concat]}
seeds: [1, 2]
world_size: 2
report: {kind: models, reference: gate, dynamics: gate}
"""

FILTERS = TINY + """name: filters
overrides: [train.max_epochs=1]
axes:
  - name: Filter
    values:
      - {label: broken, set: {prepare.category_filter: any, sharding.tables.basket: row_wise}}
      - {label: none, set: {prepare.category_filter: none}}
      - {label: last_l, set: {prepare.category_filter: last_l}}
seeds: [1]
report: {kind: filtering, paper: table6}
"""


def _command(study: Path, out: Path, parallel: int = 1) -> List[str]:
    return [str(BIN / "mdaf"), "study", "run", str(study), "--out", str(out), "--max-parallel", str(parallel)]


def _env() -> Dict[str, str]:
    # the worktree's package for the jobs too, whatever is installed
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _log_since_last_run(out: Path) -> List[str]:
    lines = (out / "study.log").read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if re.search(r" run \S+: \d+ cells", line))
    return lines[last:]


def _launched(lines: List[str]) -> List[str]:
    return [m.group(1) for line in lines if (m := re.search(r" launch (\S+):", line))]


def _markdown_rows(markdown: str, first_header: str) -> Dict[str, Dict[str, str]]:
    """The Markdown table whose first column is `first_header`, as {first cell: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


@pytest.fixture(scope="module")
def fusions(tmp_path_factory):
    """The 2 x 2 study, stopped (SIGTERM) once its first cell has results, then run again."""
    root = tmp_path_factory.mktemp("fusions")
    study, out = root / "fusions.yaml", root / "out"
    study.write_text(FUSIONS)
    first = StudyDir(out).results("fusion-gate_seed-1")
    process = subprocess.Popen(_command(study, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert first.is_file(), f"the first cell did not finish:\n{stdout}\n{stderr}"
    done_before = {p.parent.name for p in (out / "cells").glob("*/results.json")}
    first_results = first.read_text()
    second = subprocess.run(_command(study, out, parallel=2), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr}"
    return {"out": out, "interrupted": (process.returncode, stderr), "done_before": done_before, "first_results": first_results, "rerun": second.stdout}


@pytest.mark.slow
def test_a_stopped_study_trains_only_the_remaining_cells_when_run_again(fusions):
    returncode, stderr = fusions["interrupted"]
    assert returncode == 2 and stderr.strip().startswith("mdaf study: error: interrupted:")
    out, done_before = fusions["out"], fusions["done_before"]
    cells = {"fusion-gate_seed-1", "fusion-concat_seed-1", "fusion-gate_seed-2", "fusion-concat_seed-2"}
    assert "fusion-gate_seed-1" in done_before and done_before < cells
    rerun = _log_since_last_run(out)
    assert sorted(_launched(rerun)) == sorted(cells - done_before)
    assert sorted(m.group(1) for line in rerun if (m := re.search(r" skip (\S+):", line))) == sorted(done_before)
    # the finished cell was not trained again; every cell now has results of 2 ranks
    assert StudyDir(out).results("fusion-gate_seed-1").read_text() == fusions["first_results"]
    for cell in cells:
        results = json.loads(StudyDir(out).results(cell).read_text())
        assert results["world_size"] == 2 and results["epochs"] == 1
    assert "all 4 cells done" in fusions["rerun"]


@pytest.mark.slow
def test_cells_sharing_a_prepare_config_share_one_prepared_directory(fusions):
    out = fusions["out"]
    log = (out / "study.log").read_text()
    assert len(re.findall(r" prepare data \w+:", log)) == 1
    assert len(re.findall(r" reuse prepared data \w+", log)) == 1  # the second run
    (prepared,) = (out / "data").iterdir()
    for config in (out / "cells").glob("*/config.yaml"):
        assert f"data_dir: {prepared}\n" in config.read_text()


@pytest.mark.slow
def test_report_shows_the_cells_results_and_mean_std_over_seeds(fusions, capsys):
    out = fusions["out"]
    assert cli.main(["study", "report", str(out)]) == 0
    markdown = capsys.readouterr().out
    results = {cell.parent.name: json.loads(cell.read_text()) for cell in (out / "cells").glob("*/results.json")}
    rows = _markdown_rows(markdown, "Fusion")
    assert list(rows) == ["gate", "concat"]
    means = {}
    for fusion, row in rows.items():
        runs = [results[f"fusion-{fusion}_seed-{seed}"] for seed in (1, 2)]
        auc = [r["best_auc"] for r in runs]
        logloss = [next(e["logloss"] for e in r["evaluations"] if e["step"] == r["best_step"]) for r in runs]
        means[fusion] = statistics.fmean(auc)
        assert row["Seeds"] == "2"
        assert row["Val AUC"] == f"{statistics.fmean(auc):.4f} ± {statistics.stdev(auc):.4f}"
        assert row["Log Loss (best epoch)"] == f"{statistics.fmean(logloss):.3f} ± {statistics.stdev(logloss):.3f}"
        # no published row matches a fusion label: the paper's columns, n/a in every row, are left out
        assert row["Test AUC"] == "n/a" and not any(column.startswith("Paper") for column in row)
    assert rows["gate"]["Δ vs gate"] == "baseline"
    # the rows share their data: the common set is it, and Δ is the per-seed paired difference
    common = {cell.parent.name: json.loads(cell.read_text()) for cell in (out / "cells").glob("*/common.json")}
    paired = [common[f"fusion-concat_seed-{s}"]["auc"] - common[f"fusion-gate_seed-{s}"]["auc"] for s in (1, 2)]
    assert [common[f"fusion-gate_seed-{s}"]["auc"] for s in (1, 2)] == pytest.approx([results[f"fusion-gate_seed-{s}"]["best_auc"] for s in (1, 2)], abs=1e-6)
    delta, spread = round(statistics.fmean(paired) * 1e4), round(statistics.stdev(paired) * 1e4)
    assert rows["concat"]["Δ vs gate"].rstrip("*") == f"{delta:+d} ± {spread}bp".replace("+0 ", "0 ")
    # every cell's own line, and the Table 7 section of the gate row beside the paper's epochs
    cells = _markdown_rows(markdown, "Cell")
    for cell, result in results.items():
        assert cells[cell]["Val AUC"] == f"{result['best_auc']:.4f}" and cells[cell]["State"] == "done"
    epochs = _markdown_rows(markdown, "Epoch")
    assert epochs["1"]["Val AUC"] == f"{means['gate']:.4f}" and epochs["1"]["Paper Val AUC"] == "0.6007"
    train_auc = [results[f"fusion-gate_seed-{s}"]["evaluations"][0].get("train_auc") for s in (1, 2)]
    assert epochs["1"]["Train AUC"] == ("n/a" if None in train_auc else f"{statistics.fmean(train_auc):.4f}")
    # the same numbers, unrounded, for machines
    assert cli.main(["study", "report", str(out), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    gate = next(row for row in data["rows"] if row["label"] == "gate")
    assert gate["auc"]["values"] == [results[f"fusion-gate_seed-{s}"]["best_auc"] for s in (1, 2)]
    assert gate["auc"]["std"] == pytest.approx(statistics.stdev(gate["auc"]["values"]))
    assert (out / "report" / "fusions.md").read_text().strip() == markdown.strip()
    assert data["plots"] == [str(out / "report" / "curves.png")]
    _assert_png(out / "report" / "curves.png")
    assert "![curves](curves.png)" in markdown


@pytest.mark.slow
def test_filter_cells_prepare_their_own_data_and_a_failing_cell_does_not_stop_the_others(tmp_path, capsys):
    study, out = tmp_path / "filters.yaml", tmp_path / "out"
    study.write_text(FILTERS)
    run = subprocess.run(_command(study, out, parallel=3), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "1 cell(s) failed" in run.stdout
    status = json.loads((out / "status.json").read_text())
    assert status["filter-broken_seed-1"]["state"] == "failed"
    assert "sharding.tables names unknown tables ['basket']" in status["filter-broken_seed-1"]["error"]
    assert "unknown tables" in (out / "cells" / "filter-broken_seed-1" / "error.txt").read_text()
    assert status["filter-none_seed-1"]["state"] == status["filter-last-l_seed-1"]["state"] == "done"
    assert len(list((out / "data").iterdir())) == 3

    assert cli.main(["study", "report", str(out)]) == 0
    rows = _markdown_rows(capsys.readouterr().out, "Filter")
    counts = {}
    for label in ("none", "last_l"):
        config = (out / "cells" / f"filter-{label.replace('_', '-')}_seed-1" / "config.yaml").read_text()
        data_dir = Path(re.search(r"^data_dir: (.+)$", config, flags=re.M).group(1))
        meta = json.loads((data_dir / "meta.json").read_text())
        assert meta["settings"]["category_filter"] == label
        counts[label] = meta["splits"]["train"]["rows"]
        assert rows[label]["Train samples"] == f"{counts[label]:,}"
        assert rows[label]["Valid samples"] == f"{meta['splits']['valid']['rows']:,}"
    assert counts["none"] > counts["last_l"]
    assert rows["broken"]["Val AUC"] == "n/a"
    # after training, both trained cells scored on the common set: the base config's (last_l) data,
    # which is the last_l cell's own, so its common AUC is its best epoch's again
    common = {label: json.loads((out / "cells" / f"filter-{label}_seed-1" / "common.json").read_text()) for label in ("none", "last-l")}
    last_l = json.loads((out / "cells" / "filter-last-l_seed-1" / "results.json").read_text())
    assert common["none"]["data_dir"] == common["last-l"]["data_dir"] == str(data_dir)
    assert common["none"]["samples"] == common["last-l"]["samples"] == meta["splits"]["valid"]["rows"]
    assert common["last-l"]["auc"] == pytest.approx(last_l["best_auc"], abs=1e-6)
    assert rows["last_l"]["Common AUC"] == f"{common['last-l']['auc']:.4f}" and rows["none"]["Common AUC"] == f"{common['none']['auc']:.4f}"
    assert not (out / "cells" / "filter-broken_seed-1" / "common.json").exists()
    _assert_png(out / "report" / "filtering.png")


@pytest.mark.slow
def test_one_tensorboard_directory_shows_every_cell_and_compare_tabulates_them(fusions, capsys):
    out = fusions["out"]
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == cells
    assert all(list((out / "tensorboard" / cell).glob("events.out.tfevents.*")) for cell in cells)
    assert not list((out / "cells").glob("*/tensorboard"))
    assert cli.main(["compare", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| run | auc |") and rows[0].endswith("| model.fusion | train.seed |")
    assert sorted(row.split(" | ")[0] for row in rows[2:]) == [f"| out/{cell}" for cell in cells]


@pytest.mark.slow
def test_the_tiny_fusion_zoo_runs_every_row_and_reports_each_beside_the_gate(tmp_path, capsys):
    """configs/studies/tiny/fusion_zoo.yaml with one seed and one epoch: every fusion design trains
    on the same data, and the report lists each with its p-value and OptFusion's selections."""
    text = (REPO / "configs" / "studies" / "tiny" / "fusion_zoo.yaml").read_text()
    study, out = tmp_path / "fusion_zoo.yaml", tmp_path / "out"
    study.write_text(text.replace("seeds: [1, 2]", "seeds: [1]").replace("overrides: [", "overrides: [train.max_epochs=1, "))
    run = subprocess.run(_command(study, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert cli.main(["study", "report", str(out)]) == 0
    rows = _markdown_rows(capsys.readouterr().out, "Fusion")
    labels = re.findall(r'label: "([^"]+)"', text)
    assert list(rows) == labels and len(labels) == 9
    for label, row in rows.items():
        assert 0.5 < float(row["Common AUC"]) < 1.0, label
        assert row["p"] == "n/a" if label == "MDAF gate" else 0.0 <= float(row["p"].rstrip("*")) <= 1.0, label
    assert rows["OptFusion (searched, re-trained)"]["OptFusion selection"].startswith("seed 1: fusion.output = ")
    assert "static_branch.output = " in rows["OptFusion static branch (searched, re-trained)"]["OptFusion selection"]
