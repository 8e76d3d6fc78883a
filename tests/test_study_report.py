"""`mdaf study report` for every kind of report, on study directories whose cells' records are
written here (results.json, the prepared data's meta.json) instead of trained: each table's
numbers are the records' numbers, and each plot is a valid PNG."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from mdaf_dist.config import to_yaml
from mdaf_dist.studies.common import COMMON_JSON, COMMON_PREDICTIONS
from mdaf_dist.studies.datacache import prepare_key
from mdaf_dist.studies.grid import Plan, expand, plan_record
from mdaf_dist.studies.report import write_report
from mdaf_dist.studies.significance import delong_test
from mdaf_dist.studies.spec import load_study
from mdaf_dist.studies.workdir import CELL_CONFIG, StudyDir
from tests.test_study_run import _assert_png, _markdown_rows

REPO = Path(__file__).resolve().parents[1]
VOCAB = {"user": 1000, "item": 20000, "category": 300}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _recorded_study(tmp_path: Path, study_file: str) -> tuple[Plan, StudyDir, Dict[str, dict]]:
    """The study's directory as a finished run leaves it, with made-up numbers per cell."""
    plan = expand(load_study(study_file), ["prepare.input=raw.csv"])
    study_dir = StudyDir(tmp_path / "out")
    study_dir.claim(plan_record(plan))
    rng = random.Random(0)
    results = {}
    for cell in plan.cells:
        data_dir = study_dir.data(prepare_key(cell.config))
        if not data_dir.is_dir():
            data_dir.mkdir(parents=True)
            train = rng.randrange(1000, 9000)
            (data_dir / "meta.json").write_text(json.dumps({"splits": {"train": {"rows": train, "positive_share": 0.4}, "valid": {"rows": train // 5}}, "vocab": VOCAB}))
        cell_dir = study_dir.cell(cell.id)
        cell_dir.mkdir(parents=True)
        config = cell.config
        config.data_dir = str(data_dir)
        (cell_dir / CELL_CONFIG).write_text(to_yaml(config))
        evaluations = [{"epoch": e, "step": 10 * e, "auc": rng.uniform(0.55, 0.65), "logloss": rng.uniform(0.6, 0.7)} for e in (1, 2)]
        best = max(evaluations, key=lambda e: e["auc"])
        results[cell.id] = {
            "best_auc": best["auc"], "best_step": best["step"], "best_epoch": best["epoch"], "evaluations": evaluations,
            "samples_per_sec": 1000.0 * cell.world_size * rng.uniform(0.7, 1.0), "wall_seconds": rng.uniform(10, 20),
            "world_size": cell.world_size,
        }  # fmt: skip
        study_dir.results(cell.id).write_text(json.dumps(results[cell.id]))
    return plan, study_dir, results


def _bp(delta: float) -> str:
    bp = round(delta * 1e4)
    return f"{bp:+d}bp" if bp else "0bp"


def test_sensitivity_report_measures_each_value_against_the_base_cell(tmp_path):
    plan, study_dir, results = _recorded_study(tmp_path, "configs/studies/tableA1_sensitivity.yaml")
    report = write_report(study_dir.root)
    detail = {(cells["Hyperparameter"], cells["Value"]): cells for cells in _rows_of(report.markdown, "Hyperparameter", "Value")}
    base = results["base_seed-42"]["best_auc"]
    dropout = results["model-dropout-0-25_seed-42"]["best_auc"]
    row = detail[("Dropout", "0.25")]
    assert row["Val AUC"] == f"{dropout:.4f}" and row["Δ vs base"] == _bp(dropout - base)
    assert row["Paper Val AUC"] == "0.5826" and row["Paper Δ vs paper's best"] == "-181bp"
    assert detail[("Learning rate", "0.0005")]["Δ vs base"] == "0bp"
    summary = {row["Hyperparameter"]: row for row in _rows_of(report.markdown, "Hyperparameter", "Values tested")}
    lr = [results[f"train-lr-{v}_seed-42"]["best_auc"] for v in ("0-0001", "0-001")] + [base]
    assert summary["Learning rate"]["AUC range"] == f"{round((max(lr) - min(lr)) * 1e4)}bp"
    assert summary["Learning rate"]["Paper AUC range"] == "131bp"
    assert summary["Learning rate"]["Paper best value"] == "0.0005" and summary["Learning rate"]["Paper sensitivity"] == "High"
    _assert_png(study_dir.report / "sensitivity.png")
    _assert_png(study_dir.report / "curves.png")


def _rows_of(markdown: str, *first_headers: str):
    """Every body row of the table whose header starts with `first_headers`, as dicts."""
    lines = markdown.splitlines()
    prefix = "| " + " | ".join(first_headers) + " |"
    start = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            return
        yield dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))


def test_world_size_report_gives_speedup_and_parallel_efficiency(tmp_path):
    plan, study_dir, results = _recorded_study(tmp_path, "configs/studies/scaling_world.yaml")
    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "Ranks")
    rate = {n: results[f"ranks-{n}_seed-42"]["samples_per_sec"] for n in (1, 2, 4)}
    for n in (1, 2, 4):
        assert rows[str(n)]["Samples/s"] == f"{rate[n]:.0f}"
        assert rows[str(n)]["Speedup vs 1"] == f"{rate[n] / rate[1]:.2f}x"
        assert rows[str(n)]["Parallel efficiency"] == f"{rate[n] / (n * rate[1]):.2f}"
    assert [row["efficiency"] for row in report.data["rows"]] == pytest.approx([rate[n] / (n * rate[1]) for n in (1, 2, 4)])
    _assert_png(study_dir.report / "scaling_world.png")


def test_data_scaling_report_and_filtering_report_count_each_prepared_directory(tmp_path):
    plan, study_dir, results = _recorded_study(tmp_path / "data", "configs/studies/tiny/scaling_data.yaml")
    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "User fraction")
    for label in ("0.1", "1.0"):
        cells = [c for c in plan.cells if c.coords == {"User fraction": label}]
        meta = json.loads((study_dir.data(prepare_key(cells[0].config)) / "meta.json").read_text())
        auc = [results[c.id]["best_auc"] for c in cells]
        assert rows[label]["Train samples"] == f"{meta['splits']['train']['rows']:,}"
        assert rows[label]["Val AUC"] == f"{statistics.fmean(auc):.4f} ± {statistics.stdev(auc):.4f}"
    _assert_png(study_dir.report / "scaling_data.png")

    plan, study_dir, results = _recorded_study(tmp_path / "filters", "configs/studies/table6_filtering.yaml")
    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "Preprocessing stage")
    assert rows["Raw data"]["Paper train samples"] == "1,052,081" and rows["+ Category filtering"]["Paper Δ"] == "+105bp"
    raw, empty = (results[f"preprocessing-stage-{s}_seed-42"]["best_auc"] for s in ("raw-data", "empty-sequence-removal"))
    assert rows["+ Empty sequence removal"]["Δ vs previous row"] == _bp(empty - raw)
    assert len({row["Train samples"] for row in rows.values()}) == 3
    # each stage's sample drop beside the paper's (MDAF_paper.md 5.1.1: -13.0 %, then -48.3 %)
    samples = {label: int(row["Train samples"].replace(",", "")) for label, row in rows.items()}
    stage = rows["+ Empty sequence removal"]
    assert stage["Train samples vs previous row"] == f"{100 * (samples['+ Empty sequence removal'] / samples['Raw data'] - 1):+.1f} %"
    assert stage["Paper train samples vs previous row"] == "-12.9 %"
    assert rows["+ Category filtering"]["Paper train samples vs previous row"] == "-48.4 %"
    assert rows["Raw data"]["Train samples vs previous row"] == "n/a"
    _assert_png(study_dir.report / "filtering.png")


def test_models_report_puts_the_papers_numbers_beside_each_row(tmp_path):
    plan, study_dir, results = _recorded_study(tmp_path, "configs/studies/table2_baselines.yaml")
    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "Model")
    # three seeds: the per-seed paired differences, mean ± sample std, and the paired t-test
    deltas = [results[f"model-mdaf_seed-{s}"]["best_auc"] - results[f"model-bst_seed-{s}"]["best_auc"] for s in (42, 43, 44)]
    p = stats.ttest_rel([results[f"model-mdaf_seed-{s}"]["best_auc"] for s in (42, 43, 44)], [results[f"model-bst_seed-{s}"]["best_auc"] for s in (42, 43, 44)]).pvalue
    expected = f"{_bp(statistics.fmean(deltas))[:-2]} ± {round(statistics.stdev(deltas) * 1e4)}bp" + ("*" if p < 0.01 else "")
    assert rows["BST"]["Δ vs BST"] == "baseline" and rows["MDAF"]["Δ vs BST"] == expected
    assert rows["MDAF"]["p"] == f"{p:.2g}" and rows["BST"]["p"] == "n/a"
    assert rows["MDAF"]["Type"] == "Hybrid" and rows["BST"]["Paper Parameters"] == "130M"
    # D 64 embeddings of the recorded vocabulary: 21,300 x 64 = 1.4M, plus each model's own layers
    assert rows["MDAF"]["Parameters"].endswith("M") and rows["MDAF"]["Parameters"] != rows["AutoInt"]["Parameters"]
    assert rows["MDAF"]["Paper Val AUC"] == "0.6007" and rows["MDAF"]["Paper Δ vs BST"] == "+296bp" and rows["BST"]["Paper Δ vs BST"] == "baseline"
    epochs = _markdown_rows(report.markdown, "Epoch")
    mdaf_epoch2 = [results[f"model-mdaf_seed-{s}"]["evaluations"][1]["auc"] for s in (42, 43, 44)]
    assert epochs["2"]["Val AUC"] == f"{statistics.fmean(mdaf_epoch2):.4f}" and epochs["2"]["Paper Train AUC"] == "0.7738"


def test_a_study_of_the_authors_config_shows_their_readme_numbers_beside_the_papers(tmp_path):
    plan, study_dir, results = _recorded_study(tmp_path, "configs/studies/table2_authors_readme.yaml")
    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "Model")
    # the authors' README, Performance Results: Val AUC, Test AUC, Parameters, Improvement vs BST
    readme = {"BST": ("0.5711", "0.5698", "130M", "baseline"), "AutoInt": ("0.5655", "0.5648", "23M", "-56bp"),
              "DCNv2": ("0.5602", "0.5594", "23M", "-109bp"), "MDAF": ("0.6007", "0.5992", "46M", "+296bp")}  # fmt: skip
    columns = ("Authors' README Val AUC", "Authors' README Test AUC", "Authors' README Parameters", "Authors' README Δ vs BST")
    for label, numbers in readme.items():
        assert tuple(rows[label][column] for column in columns) == numbers
    assert all(rows[label][column] == "n/a" for label in ("Mamba4Rec", "Static only (DCNv3)") for column in columns)
    # the paper's own columns stay beside them
    assert rows["AutoInt"]["Paper Val AUC"] == "0.5499" and rows["AutoInt"]["Paper Δ vs BST"] == "-212bp"
    # neither paper has a column that is n/a in every row: no log loss in the README, no test AUC in the paper
    assert "Authors' README Log Loss" not in rows["MDAF"] and "Paper Test AUC" not in rows["MDAF"]
    assert "Paper numbers: MDAF_paper.md 5.2" in report.markdown and "Authors' README numbers: the MDAF authors' repository README" in report.markdown

    data = {row["label"]: row for row in report.data["rows"]}
    assert data["MDAF"]["paper2"]["auc"] == 0.6007 and data["MDAF"]["paper2"]["test_auc"] == 0.5992
    assert data["AutoInt"]["paper2"]["delta_bp"] == -56 and data["AutoInt"]["paper"]["auc"] == 0.5499
    assert data["Mamba4Rec"]["paper2"] is None and data["Mamba4Rec"]["paper"]["auc"] == 0.5716


FILTER_STUDY = """name: filters
configs: [configs/paper.yaml, configs/studies/tiny/base_config.yaml]
axes:
  - {name: Filter, key: prepare.category_filter, values: [none, last_l]}
seeds: [1]
report: {kind: filtering, paper: table6, reference: none}
"""


def _write_common(study_dir: StudyDir, cell_id: str, labels: np.ndarray, logits: np.ndarray) -> float:
    """A cell's predictions on the common set and its common.json, as the runner leaves them."""
    auc = float(stats.mannwhitneyu(logits[labels == 1], logits[labels == 0]).statistic / ((labels == 1).sum() * (labels == 0).sum()))
    cell_dir = study_dir.cell(cell_id)
    (cell_dir / COMMON_PREDICTIONS).mkdir()
    pq.write_table(pa.table({"label": labels.astype(np.int8), "logit": logits.astype(np.float32)}), cell_dir / COMMON_PREDICTIONS / "part-00000.parquet")
    (cell_dir / COMMON_JSON).write_text(json.dumps({"auc": auc, "logloss": 0.6, "samples": len(labels)}))
    return auc


def test_a_filtered_row_better_on_its_own_validation_set_but_worse_on_the_common_one_gets_a_negative_delta(tmp_path):
    study_file = tmp_path / "filters.yaml"
    study_file.write_text(FILTER_STUDY)
    plan, study_dir, results = _recorded_study(tmp_path, str(study_file))
    none, last_l = "filter-none_seed-1", "filter-last-l_seed-1"
    # on its own (filtered) validation set the filtered model looks better ...
    for cell, auc in ((none, 0.60), (last_l, 0.62)):
        results[cell]["best_auc"] = auc
        study_dir.results(cell).write_text(json.dumps(results[cell]))
    # ... on the common set it is worse: its scores are the unfiltered model's plus more noise
    rng = np.random.default_rng(3)
    labels = (rng.random(2000) < 0.4).astype(np.int8)
    signal = labels + rng.normal(size=2000)
    common = {none: _write_common(study_dir, none, labels, signal), last_l: _write_common(study_dir, last_l, labels, signal + rng.normal(scale=1.5, size=2000))}
    assert common[last_l] < common[none]

    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "Filter")
    assert rows["last_l"]["Val AUC"] == "0.6200" and rows["last_l"]["Common AUC"] == f"{common[last_l]:.4f}"
    assert rows["last_l"]["Δ vs none"].startswith("-") and rows["last_l"]["Δ vs none"].rstrip("*") == _bp(common[last_l] - common[none])
    assert rows["none"]["Δ vs none"] == "baseline"
    assert "Rows were validated on different sample sets" in report.markdown.split("| Filter |")[0]
    # the paper's stages, matched by the settings each row ran: no all-"n/a" column
    assert rows["last_l"]["Paper train samples"] == "473,044" and rows["none"]["Paper train samples"] == "915,915"
    assert rows["last_l"]["Paper stage"] == "+ Hyperparameter tuning" and rows["none"]["Paper stage"] == "n/a"
    assert all(any(row[column] != "n/a" for row in rows.values()) for column in rows["none"])

    data = {row["label"]: row for row in write_report(study_dir.root).data["rows"]}
    assert data["last_l"]["common_auc"] == {"mean": common[last_l], "std": None, "n": 1, "values": [common[last_l]]}
    assert data["none"]["common_samples"] == data["last_l"]["common_samples"] == 2000
    assert data["none"]["p_value"] is None
    predictions = {cell: pq.read_table(study_dir.cell(cell) / COMMON_PREDICTIONS).column("logit").to_numpy() for cell in (none, last_l)}
    p = delong_test(labels, predictions[last_l], predictions[none])
    assert data["last_l"]["p_value"] == pytest.approx(p) and 0.0 <= p <= 1.0 and data["last_l"]["test"] == "DeLong"
    assert rows["last_l"]["p"] == f"{p:.2g}"


OPTFUSION_STUDY = """name: zoo
configs: [configs/paper.yaml]
axes:
  - name: Fusion
    values:
      - {label: gate}
      - {label: OptFusion, set: {model.fusion: optfusion, model.optfusion_stage: search_retrain}}
seeds: [1, 2]
report: {kind: models, reference: gate}
"""


def test_models_report_gives_time_per_epoch_and_the_optfusion_selection_of_each_seed(tmp_path):
    study_file = tmp_path / "zoo.yaml"
    study_file.write_text(OPTFUSION_STUDY)
    plan, study_dir, results = _recorded_study(tmp_path, str(study_file))
    train_rows = json.loads(next(study_dir.root.glob("data/*/meta.json")).read_text())["splits"]["train"]["rows"]
    search_speed = {1: 500.0, 2: 250.0}
    for seed, operation in ((1, "prod"), (2, "att")):
        search = study_dir.cell(f"fusion-optfusion_seed-{seed}") / "search"
        search.mkdir()
        (search / "results.json").write_text(json.dumps({"samples_per_sec": search_speed[seed]}))
        selection = {"fusion": {"output": {"inputs": ["h_static", "h_seq"] if seed == 1 else ["h_seq"], "operation": operation}}}
        (search / "optfusion_architecture.json").write_text(json.dumps(selection))
    report = write_report(study_dir.root)
    rows = _markdown_rows(report.markdown, "Fusion")

    def epoch_seconds(cell: str) -> float:
        return statistics.fmean(train_rows / results[f"{cell}_seed-{s}"]["samples_per_sec"] for s in (1, 2))

    search_seconds = statistics.fmean(train_rows / speed for speed in search_speed.values())
    assert rows["gate"]["s / epoch"] == f"{epoch_seconds('fusion-gate'):.1f}"
    assert rows["OptFusion"]["s / epoch"] == f"{epoch_seconds('fusion-optfusion'):.1f} (+{search_seconds:.1f} search)"
    assert rows["OptFusion"]["OptFusion selection"] == "seed 1: fusion.output = prod(h_static, h_seq)<br>seed 2: fusion.output = att(h_seq)"
    assert rows["gate"]["OptFusion selection"] == "n/a"
    # the re-trained model's count: the gate's 2D -> D -> 1 (D = 64) gone, prod has no parameters
    parameters = {row["label"]: row["parameters"] for row in report.data["rows"]}
    assert parameters["gate"] - parameters["OptFusion"] == 2 * 64 * 64 + 64 + 64 + 1
