"""Study files and their grids, without training: every shipped study expands; bad input is one
line naming the problem; a directory holding another study is left untouched; the Slurm dry run
prints a valid sbatch job per cell."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from mdaf_dist import cli
from mdaf_dist.studies.common import common_config
from mdaf_dist.studies.datacache import prepare_key
from mdaf_dist.studies.grid import expand
from mdaf_dist.studies.spec import load_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "configs" / "studies"
TINY_TABLE3 = "configs/studies/tiny/table3_ablations.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    """Study files name config files relative to the repository root, as the README runs them."""
    monkeypatch.chdir(REPO)


def _error(capsys, *argv: str) -> str:
    assert cli.main(["study", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"expected one line, got:\n{err}"
    return err.strip()


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _study(axes: str) -> str:
    return f"name: bad\nconfigs: [configs/paper.yaml]\naxes:\n{axes}"


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in STUDIES.rglob("*.yaml") if p.name != "base_config.yaml"))
def test_every_shipped_study_expands_to_its_cells(path):
    plan = expand(load_study(str(path)))
    assert plan.cells and len({cell.id for cell in plan.cells}) == len(plan.cells)
    # every point of the report is measured by one of the cells
    assert {point.cell_id for point in plan.points} == {cell.id for cell in plan.cells}


def test_every_full_study_has_a_tiny_variant_with_the_same_axes():
    for full in STUDIES.glob("*.yaml"):
        tiny = STUDIES / "tiny" / full.name
        assert tiny.is_file(), f"{full.name} has no tiny variant"
        full_axes = [axis.name for axis in load_study(str(full.relative_to(REPO))).axes]
        assert [axis.name for axis in load_study(str(tiny.relative_to(REPO))).axes] == full_axes


def test_product_grid_trains_every_combination_per_seed_with_the_seed_set():
    plan = expand(load_study(TINY_TABLE3))
    assert len(plan.cells) == 8 * 2
    cell = next(c for c in plan.cells if c.coords == {"Configuration": "w/o Gate (concat)"} and c.seed == 2)
    assert cell.config.model.fusion == "concat" and cell.config.train.seed == 2 and cell.config.loader.seed == 2
    # the variant's overlay file sits on the tiny base: the tiny sizes stay
    assert cell.config.model.embedding_dim == 8


def test_one_at_a_time_shares_the_base_cell_across_axes():
    study = load_study("configs/studies/tableA1_sensitivity.yaml")
    plan = expand(study)
    values = sum(len(axis.values) for axis in study.axes)
    # each of the 5 axes holds the paper's setting once: those 5 points are one `base` cell
    assert len(plan.cells) == values - len(study.axes) + 1
    base = [p for p in plan.points if p.cell_id == "base_seed-42"]
    assert sorted(p.coords.get("train.lr", "") for p in base if p.coords) == ["", "", "", "", "0.0005"]
    lr = next(c for c in plan.cells if c.coords == {"train.lr": "0.0001"})
    assert lr.config.train.lr == 0.0001 and lr.config.model.dropout == 0.15


def test_world_size_axis_and_command_line_set_the_component_ranks():
    plan = expand(load_study("configs/studies/tiny/scaling_world.yaml"))
    assert [c.nproc_per_node for c in plan.cells] == [1, 2, 4]
    plan = expand(load_study(TINY_TABLE3), ["world_size=2", "train.max_epochs=1"])
    assert {(c.nproc_per_node, c.config.train.max_epochs) for c in plan.cells} == {(2, 1)}


def test_the_authors_table2_study_trains_every_model_on_the_authors_config():
    plan = expand(load_study("configs/studies/table2_authors_readme.yaml"))
    models = {cell.coords["Model"]: cell.config for cell in plan.cells if cell.seed == 42}
    # configs/authors_readme.yaml under each model's own overlay: D 32, 3 + 3 cross layers, 2 Mamba layers, gate 64, batch 512
    assert models["AutoInt"].model.name == "autoint" and models["MDAF"].model.name == "mdaf"
    for config in models.values():
        model = config.model
        assert (model.embedding_dim, model.lcn_layers, model.ecn_layers, model.mamba_layers, model.gate_hidden) == (32, 3, 3, 2, 64)
        assert config.loader.batch_size == 512
    assert plan.study.file.report.paper2 == "table2_authors_readme"


@pytest.mark.parametrize(
    "report, message",
    [
        ("{kind: models, paper: table2, paper2: table2_authors}",
         "report.paper2 must be one of ('', 'table2', 'table2_authors_readme', 'table3', 'table6', 'tableA1'), got 'table2_authors'"),
        ("{kind: filtering, paper: table6, paper2: table2_authors_readme}", "report.paper2 is shown by models reports only, not 'filtering'"),
    ],
)  # fmt: skip
def test_a_second_paper_that_is_unknown_or_on_a_report_without_it_is_one_line(tmp_path, capsys, report, message):
    path = _write(tmp_path, _study("  - {key: model.fusion, values: [gate, concat]}\n") + f"report: {report}\n")
    assert _error(capsys, "run", path, "--out", str(tmp_path / "out")) == f"mdaf study: error: {path}: {message}"


def test_unknown_axis_key_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, _study("  - {key: model.fusoin, values: [gate, concat]}\n"))
    err = _error(capsys, "run", path, "--out", str(tmp_path / "out"))
    assert err == f"mdaf study: error: {path}: axis model.fusoin: Key 'fusoin' not in 'ModelConfig'. Did you mean: 'fusion'?"
    assert not (tmp_path / "out").exists()


def test_axis_without_values_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, _study("  - {key: model.fusion, values: []}\n"))
    assert _error(capsys, "run", path, "--out", str(tmp_path / "out")) == f"mdaf study: error: {path}: axis 'model.fusion' has no values"


def test_an_evaluation_set_that_is_not_prepare_settings_is_one_line(tmp_path, capsys):
    axes = "  - {key: model.fusion, values: [gate, concat]}\n"
    path = _write(tmp_path, _study(axes) + "evaluate_on: [train.lr=0.1]\n")
    assert _error(capsys, "run", path, "--out", str(tmp_path / "out")) == (
        f"mdaf study: error: {path}: evaluate_on names the common evaluation set's data: only prepare.* settings, got 'train.lr=0.1'"
    )
    path = _write(tmp_path, _study(axes) + "evaluate_on: [prepare.category_filtr=none]\n", "typo.yaml")
    assert _error(capsys, "run", path, "--out", str(tmp_path / "out")).startswith(
        f"mdaf study: error: {path}: evaluate_on: prepare.category_filtr: Key 'category_filtr' not in 'PrepareConfig'."
    )


def test_the_common_evaluation_set_is_the_base_config_with_evaluate_on():
    plan = expand(load_study("configs/studies/tiny/scaling_filter.yaml"), ["prepare.input=raw.csv"])
    keys = {cell.coords["Category filter"]: prepare_key(cell.config) for cell in plan.cells}
    assert len(set(keys.values())) == 4
    # the filter study names the unfiltered data: the none row trains on exactly that data
    assert plan.study.file.evaluate_on == ["prepare.category_filter=none"]
    common = common_config(plan)
    assert common.prepare.category_filter == "none" and common.prepare.input == "raw.csv" and common.model.history_length == 10
    assert prepare_key(common) == keys["none"]
    # without evaluate_on: the base config's own data (the paper's filter), which the last_l row trains on
    plan.study.file.evaluate_on = []
    assert common_config(plan).prepare.category_filter == "last_l" and prepare_key(common_config(plan)) == keys["last_l"]


def test_a_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    csv = _write(tmp_path, "1,2,3,pv,1511539200\n1,3,3,pv,1511539201\n", "raw.csv")
    assert _error(capsys, "run", csv, "--out", str(tmp_path / "out")) == (
        f"mdaf study: error: {csv}: not a study file: expected a YAML mapping with name, axes, seeds, got str"
    )
    broken = _write(tmp_path, "name: [unclosed\n", "broken.yaml")
    assert re.fullmatch(rf"mdaf study: error: {re.escape(broken)}: not a YAML file \(.+\)", _error(capsys, "run", broken, "--out", str(tmp_path / "out")))


def test_a_study_without_input_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert _error(capsys, "run", "configs/studies/table3_ablations.yaml", "--out", str(out)) == (
        "mdaf study: error: the study has no input data: pass prepare.input=PATH (raw UserBehavior CSV or zip), "
        "or give the study file a synth section"
    )
    assert not out.exists()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_directory_holding_another_study_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "cells" / "x_seed-1").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"name": "scaling_data_tiny", "overrides": []}))
    (out / "cells" / "x_seed-1" / "results.json").write_text("{}")
    before = _snapshot(out)
    assert _error(capsys, "run", TINY_TABLE3, "--out", str(out)) == (
        f"mdaf study: error: {out} holds another study ('scaling_data_tiny'): choose another --out for 'table3_ablations_tiny'"
    )
    (out / "study.json").write_text(json.dumps({"name": "table3_ablations_tiny", "overrides": []}))
    before = _snapshot(out)
    assert _error(capsys, "run", TINY_TABLE3, "--out", str(out), "train.lr=0.1") == (
        f"mdaf study: error: {out} holds study 'table3_ablations_tiny' run with overrides [], not ['train.lr=0.1']: choose another --out"
    )
    assert _snapshot(out) == before


def test_slurm_dryrun_prints_a_valid_sbatch_job_per_cell(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["study", "run", TINY_TABLE3, "--out", str(out), "--scheduler", "slurm", "--dryrun", "--scheduler-args", "partition=gpu"]) == 0
    printed = capsys.readouterr().out
    plan = expand(load_study(TINY_TABLE3))
    scripts = re.findall(r"# SBATCH_SCRIPT\n#-+\n(.*?)(?=\n== cell |\Z)", printed, flags=re.S)
    assert len(scripts) == len(plan.cells)
    for cell, script in zip(plan.cells, scripts):
        assert script.startswith("#!/bin/bash\n") and "#SBATCH" in script and "--partition=gpu" in script
        config = out.resolve() / "cells" / cell.id / "config.yaml"
        assert "--nnodes 1 --nproc_per_node 1 " in script and f" -m mdaf_dist.train --config {config}'" in script
        path = tmp_path / f"{cell.id}.sbatch"
        path.write_text(script)
        syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    # a dry run writes nothing
    assert not out.exists()
