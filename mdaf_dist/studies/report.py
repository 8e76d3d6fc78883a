"""`mdaf study report DIR`: a study's table in the paper's shape, the paper's numbers beside ours,
and its plots, as DIR/report/<study>.md (+ .json, + PNGs).

Numbers are written as the paper writes them: AUC to 4 places, log loss to 3, differences in
basis points (1bp = 0.0001 AUC). Ours are mean ± sample std over seeds (just the mean for one
seed). A metric a run did not record is "n/a". Every number of ours comes from the cells'
results.json and their data's meta.json (`results`); the paper's from `paper`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mdaf_dist.analysis.dynamics import table7
from mdaf_dist.analysis.report import markdown_table
from mdaf_dist.studies import paper, plots
from mdaf_dist.studies.results import CellRecord, Row, Stat, load_cells, rows
from mdaf_dist.files import read_json, write_json
from mdaf_dist.studies.significance import Comparison, compare
from mdaf_dist.studies.workdir import CELL_CONFIG, StudyDir

NA = "n/a"
WALL = "Train loop s"
WALL_NOTE = (
    f"{WALL}: wall seconds of the training loop, every epoch with its evaluations and checkpoints (results.json "
    "`wall_seconds`); not the job's start-up, model building or data preparation; a resumed run counts from its resume."
)
EPOCH_NOTE = (
    "s / epoch: one epoch's training samples over the run's samples/s (evaluation and checkpoints included), mean over "
    "seeds; an OptFusion row run as search_retrain shows its re-train's and, in brackets, its search's. OptFusion "
    "selection: per seed, each fusion point's operation and connected inputs (models/optfusion.py)."
)


# -- formatting -------------------------------------------------------------------------------
def fmt_stat(stat: Optional[Stat], digits: int = 4) -> str:
    if stat is None:
        return NA
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def fmt_value(value: Optional[float], digits: int = 4) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def fmt_bp(delta: Optional[float]) -> str:
    """An AUC difference in basis points, as the paper writes it: +296bp, -26bp, 0bp."""
    if delta is None:
        return NA
    return _bp_text(round(delta * 1e4))


def fmt_range(values: Sequence[float]) -> str:
    """The spread of AUCs, max - min, in basis points."""
    return f"{round((max(values) - min(values)) * 1e4)}bp"


def fmt_paper_bp(bp: Optional[int]) -> str:
    return "baseline" if bp is None else _bp_text(bp)


def _bp_text(bp: int) -> str:
    return f"{bp:+d}bp" if bp else "0bp"


def fmt_count(value: Optional[float]) -> str:
    return NA if value is None else f"{int(value):,}"


def _mean(stat: Optional[Stat]) -> Optional[float]:
    return None if stat is None else stat.mean


def _change(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """The relative change from `reference` (a filter's sample drop is negative)."""
    return None if value is None or not reference else value / reference - 1


def fmt_share_change(change: Optional[float]) -> str:
    return NA if change is None else f"{100 * change:+.1f} %"


def fmt_params(count: Optional[int]) -> str:
    if count is None:
        return NA
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def fmt_p(comparison: Optional[Comparison]) -> str:
    """The comparison's p-value (n/a for the reference row or without a test)."""
    p = None if comparison is None else comparison.p_value
    return NA if p is None else f"{p:.2g}"


def fmt_delta(comparison: Optional[Comparison]) -> str:
    """Mean paired difference in bp, ± its sample std over seeds, * when p < 0.01."""
    if comparison is None:
        return "baseline"
    if comparison.mean is None:
        return NA
    text = fmt_bp(comparison.mean)
    if comparison.std is not None:
        text = f"{text[:-2]} ± {round(comparison.std * 1e4)}bp"
    return text + ("*" if comparison.significant else "")


# -- what the rows are compared on ----------------------------------------------------------------
@dataclass
class _Basis:
    """The AUC that differences are measured on: the common evaluation set's once every trained
    cell has been scored on it, else each row's own validation set's; and what to say about it."""

    metric: str
    above: str
    below: str

    def compare(self, row: Row, reference: Row) -> Optional[Comparison]:
        """The row against its reference (None for the reference itself)."""
        if row is reference:
            return None
        ours, theirs = _by_seed(row, self.metric), _by_seed(reference, self.metric)
        same_samples = None
        seeds = [seed for seed in ours if seed in theirs]
        if self.metric == "common_auc" and len(seeds) == 1:
            same_samples = _same_samples(_cell_of(row, seeds[0]), _cell_of(reference, seeds[0]))
        return compare(ours, theirs, same_samples)


def _by_seed(row: Row, metric: str) -> Dict[int, float]:
    return {cell.seed: value for cell in row.cells if (value := cell.metric(metric)) is not None}


def _cell_of(row: Row, seed: int) -> CellRecord:
    return next(cell for cell in row.cells if cell.seed == seed)


def _same_samples(ours: CellRecord, reference: CellRecord) -> Optional[tuple]:
    """(labels, our logits, the reference's logits) on the common set, when both were scored on
    the same rows."""
    a, b = ours.common_predictions(), reference.common_predictions()
    if a is None or b is None or len(a[0]) != len(b[0]) or not np.array_equal(a[0], b[0]):
        return None
    return a[0], a[1], b[1]


def _basis_name(basis: _Basis) -> str:
    return "common evaluation set" if basis.metric == "common_auc" else "rows' own validation sets"


def _basis(cells: Dict[str, CellRecord], reference: str) -> _Basis:
    trained = [cell for cell in cells.values() if cell.results]
    scored = [cell for cell in trained if cell.common]
    sets = {cell.setting("data_dir") for cell in trained}
    samples = next((cell.metric("common_samples") for cell in scored), None)
    below = (
        f"Δ vs {reference}: the paired difference of each seed's AUC from the reference row's, mean ± sample std over "
        "the seeds both rows have, in bp. p: paired t-test over those seeds (scipy.stats.ttest_rel); with one seed, "
        "DeLong's test of the two AUCs on the common set's samples. * p < 0.01, the paper's mark. "
        "Log loss: of the best epoch (the epoch of the best validation AUC, whose checkpoint is kept)."
    )
    if trained and len(scored) == len(trained):
        common = f"the common evaluation set ({fmt_count(samples)} validation samples, the same for every row)"
        above = f"Δ and p are computed on {common}: Common AUC is each cell's best checkpoint scored on it."
        if len(sets) > 1:
            above = "Rows were validated on different sample sets (Val AUC: each on its own data's validation split). " + above
        return _Basis("common_auc", above, below)
    above = "Δ and p are computed on each row's own validation set: not every trained cell has been scored on the common evaluation set yet."
    if len(sets) > 1:
        above = "Rows were validated on different sample sets, so their Δ are not comparable: " + above[:1].lower() + above[1:]
    return _Basis("auc", above, below)


def _row_data(row: Row, metrics: Sequence[str], comparison: Optional[Comparison] = None, **extra: Any) -> Dict[str, Any]:
    stats = {m: row.stat(m) for m in ("auc", *metrics, "common_auc", "common_logloss")}
    samples = row.stat("common_samples")
    return {
        "label": row.label,
        "coords": row.coords,
        "cells": [cell.id for cell in row.cells],
        **{m: (s.as_dict() if s else None) for m, s in stats.items()},
        "common_samples": None if samples is None else int(samples.mean),
        "delta": None if comparison is None else {"mean": comparison.mean, "std": comparison.std, "n": len(comparison.deltas), "values": comparison.deltas},
        "test": None if comparison is None else (comparison.test or None),
        "p_value": None if comparison is None else comparison.p_value,
        **extra,
    }


# -- the report's parts ---------------------------------------------------------------------------
@dataclass
class Report:
    markdown: str
    data: Dict[str, Any]


@dataclass
class _Parts:
    """What one kind of report adds: Markdown sections, JSON, plot files."""

    sections: List[str] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)
    # each PNG with the caption printed under it
    plots: List[Tuple[Path, str]] = field(default_factory=list)


def _first_axis_name(plan: Dict[str, Any]) -> str:
    return plan["axes"][0]["name"] if len(plan["axes"]) == 1 else "Setting"


def _parameters(row: Row) -> Optional[int]:
    """The row's model's parameter count, built on the meta device from its config and the
    vocabulary sizes of its data (embeddings included, as the paper counts them); of an OptFusion
    search_retrain cell, the re-trained model's, once its search has selected one."""
    import torch  # the models only for a models report

    from mdaf_dist.config import load_config
    from mdaf_dist.models.describe import count_parts
    from mdaf_dist.models.optfusion import stages
    from mdaf_dist.models.registry import build_model

    for cell in row.cells:
        if cell.config is None or not cell.meta or "vocab" not in cell.meta:
            continue
        # the cell's directory, wherever the study directory now is
        cfg = stages(dataclasses.replace(load_config(str(cell.dir / CELL_CONFIG)), output_dir=str(cell.dir)))[-1]
        if cfg.model.optfusion_architecture and not Path(cfg.model.optfusion_architecture).is_file():
            continue
        vocab = {name: int(cell.meta["vocab"][name]) for name in ("user", "item", "category")}
        model = build_model(cfg.model, vocab, embedding_backend="plain", embedding_device=torch.device("meta"))
        return dict(count_parts(model))["total"]
    return None


def _optfusion_selections(row: Row) -> List[str]:
    """Each seed's selected OptFusion architecture (empty for a row without OptFusion)."""
    from mdaf_dist.config import load_config
    from mdaf_dist.models.optfusion import describe_architecture, run_architecture

    selections = []
    for cell in row.cells:
        path = run_architecture(load_config(str(cell.dir / CELL_CONFIG)).model, cell.dir) if cell.config is not None else None
        if path is not None and path.is_file():
            selections.append(f"seed {cell.seed}: " + "; ".join(describe_architecture(read_json(path, "OptFusion's selected architecture"))))
    return selections


def _epoch_time(row: Row) -> str:
    """Seconds per epoch, mean over seeds; an OptFusion search_retrain row adds its search's."""
    from mdaf_dist.models.optfusion import SEARCH_DIR

    text = fmt_value(_mean(row.stat("epoch_seconds")), 1)
    searches = [dataclasses.replace(cell, results=read_json(path, "a run's record")) for cell in row.cells if (path := cell.dir / SEARCH_DIR / "results.json").is_file()]
    search = Row(row.label, row.coords, searches).stat("epoch_seconds")
    return text if search is None else f"{text} (+{search.mean:.1f} search)"


# the report fields naming the mdaf_dist.studies.paper tables a models report shows beside ours
PAPER_FIELDS = ("paper", "paper2")


def _published_header(table: paper.PaperTable) -> List[str]:
    """One paper's column group, headed by its title ("Paper Val AUC")."""
    return [f"{table.title} {name}" for name in ("Parameters", "Val AUC", "Test AUC", "Log Loss", f"Δ vs {table.reference}")]


def _published_cells(published: Optional[paper.PaperRow]) -> List[str]:
    if published is None:
        return [NA] * 5
    return [
        published.parameters or NA, fmt_value(published.auc), fmt_value(published.test_auc),
        fmt_value(published.logloss, 3), fmt_paper_bp(published.delta_bp),
    ]  # fmt: skip


def _models(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Tables 2 and 3: AUC and log loss per model/variant, the difference from a reference row,
    beside each paper's (`paper`, `paper2`) published numbers; a paper's column that is n/a in
    every row is left out."""
    parts = _Parts()
    tables = {key: table for key in PAPER_FIELDS if (table := paper.TABLES.get(plan["report"].get(key, "")))}
    table_rows = rows(plan, cells)
    ref_label = plan["report"]["reference"] or table_rows[0].label
    reference = next((r for r in table_rows if r.label == ref_label), table_rows[0])
    basis = _basis(cells, reference.label)
    typed = "paper" in tables and any(r.kind for r in tables["paper"].rows.values())
    body, published_body, data = [], [], []
    for row in table_rows:
        published = {key: tables[key].rows.get(row.label) if key in tables else None for key in PAPER_FIELDS}
        comparison = basis.compare(row, reference)
        parameters = _parameters(row)
        kind = published["paper"].kind if published["paper"] else NA
        selections = _optfusion_selections(row)
        body.append([
            row.label, *([kind] if typed else []), str(len(row.cells)), fmt_params(parameters), _epoch_time(row),
            fmt_stat(row.stat("auc")), fmt_stat(row.stat("logloss"), 3), fmt_stat(row.stat("common_auc")),
            fmt_delta(comparison), fmt_p(comparison), fmt_stat(row.stat("test_auc")),
        ])  # fmt: skip
        published_body.append([*[text for key in tables for text in _published_cells(published[key])], "<br>".join(selections) or NA])
        data.append(_row_data(
            row, ("logloss", "test_auc", "train_auc", "epoch_seconds"), comparison, parameters=parameters, optfusion=selections,
            **{key: published[key].__dict__ if published[key] else None for key in PAPER_FIELDS},
        ))  # fmt: skip
    header = [
        _first_axis_name(plan), *(["Type"] if typed else []), "Seeds", "Parameters", "s / epoch", "Val AUC", "Log Loss (best epoch)",
        "Common AUC", f"Δ vs {reference.label}", "p", "Test AUC",
    ]  # fmt: skip
    published_header = [name for table in tables.values() for name in _published_header(table)] + ["OptFusion selection"]
    published_header, published_body = _without_empty_columns(published_header, published_body)
    body = [ours + theirs for ours, theirs in zip(body, published_body)]
    parts.sections += [basis.above, markdown_table(header + published_header, body), basis.below, EPOCH_NOTE]
    parts.sections += [f"{table.title} numbers: {table.source}." for table in tables.values()]
    parts.data["rows"] = data
    parts.data["reference"] = reference.label
    parts.data["compared_on"] = basis.metric
    dynamics = plan["report"].get("dynamics", "")
    row = next((r for r in table_rows if r.label == dynamics), None)
    if row is not None:
        parts.sections.append(_dynamics(row, parts))
    return parts


def _epoch_means(row: Row) -> Dict[int, Dict[str, Optional[float]]]:
    """Per epoch: the mean over the row's seeds of val AUC, log loss and train AUC, and the
    sample std of val AUC (`auc_std`, None with one seed)."""
    by_epoch: Dict[int, Dict[str, List[float]]] = {}
    for cell in row.cells:
        for evaluation in cell.curve():
            slot = by_epoch.setdefault(int(evaluation["epoch"]), {"auc": [], "logloss": [], "train_auc": []})
            for key in slot:
                if evaluation.get(key) is not None:
                    slot[key].append(float(evaluation[key]))
    return {
        epoch: {**{k: (sum(v) / len(v) if v else None) for k, v in values.items()}, "auc_std": Stat(values["auc"]).std if values["auc"] else None}
        for epoch, values in sorted(by_epoch.items())
    }


def _dynamics(row: Row, parts: _Parts) -> str:
    """Table 7 (the analysis module's table, the paper's epochs beside ours) of one row, its
    per-epoch numbers the means over the row's seeds."""
    means = _epoch_means(row)
    parts.data["dynamics"] = {"label": row.label, "epochs": means}
    evaluations = [{"epoch": epoch, **values} for epoch, values in means.items() if values["auc"] is not None]  # table7 ignores auc_std
    return f"Training dynamics of {row.label} (mean over {len(row.cells)} seed(s)):\n\n{table7(evaluations).markdown()}"


def _paper_stage(row: Row, prepare_only: bool) -> Optional[str]:
    """The Table 6 stage whose settings every cell of the row has (its prepare.* settings alone
    with `prepare_only`: the same samples, whatever the model)."""
    for stage, settings in paper.TABLE6_SETTINGS.items():
        wanted = {k: v for k, v in settings.items() if k.startswith("prepare.") or not prepare_only}
        if row.cells and all(cell.setting(k) == v for cell in row.cells for k, v in wanted.items()):
            return stage
    return None


def _without_empty_columns(header: List[str], body: List[List[str]]) -> tuple[List[str], List[List[str]]]:
    keep = [i for i in range(len(header)) if any(line[i] != NA for line in body)]
    return [header[i] for i in keep], [[line[i] for i in keep] for line in body]


def _filtering(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Table 6 and filter scaling: training samples (from prepare's meta.json) and AUC per setting,
    each row against the study's reference row (against the previous row without one, as Table 6
    measures each stage), the paper's Table 6 numbers wherever a row ran a stage's settings."""
    parts = _Parts()
    table_rows = rows(plan, cells)
    ref_label = plan["report"]["reference"]
    fixed = next((r for r in table_rows if r.label == ref_label), None)
    basis = _basis(cells, ref_label or "previous row")
    paper_auc = {row.label: paper.TABLE6.rows[stage].auc for row in table_rows if (stage := _paper_stage(row, prepare_only=False))}
    body, data = [], []
    for i, row in enumerate(table_rows):
        reference = fixed or table_rows[max(i - 1, 0)]
        comparison = basis.compare(row, reference)
        stage, samples_stage = _paper_stage(row, prepare_only=False), _paper_stage(row, prepare_only=True)
        reference_stage = _paper_stage(reference, prepare_only=True)
        samples_change = paper_samples_change = None
        if reference is not row:
            samples_change = _change(_mean(row.stat("train_samples")), _mean(reference.stat("train_samples")))
            paper_samples_change = _change(*(paper.TABLE6.rows[s].train_samples if s else None for s in (samples_stage, reference_stage)))
        if fixed is None:
            paper_delta = fmt_paper_bp(paper.TABLE6.rows[stage].delta_bp) if stage else NA
        elif row is fixed:
            paper_delta = "baseline" if row.label in paper_auc else NA
        else:
            paper_delta = fmt_bp(paper_auc[row.label] - paper_auc[fixed.label]) if row.label in paper_auc and fixed.label in paper_auc else NA
        share = _mean(row.stat("train_positive_share"))
        body.append([
            row.label, str(len(row.cells)), fmt_count(_mean(row.stat("train_samples"))), fmt_share_change(samples_change),
            fmt_count(_mean(row.stat("valid_samples"))), NA if share is None else f"{100 * share:.1f}",
            fmt_stat(row.stat("auc")), fmt_stat(row.stat("common_auc")), fmt_delta(comparison), fmt_p(comparison),
            stage or NA, fmt_count(paper.TABLE6.rows[samples_stage].train_samples if samples_stage else None),
            fmt_share_change(paper_samples_change), fmt_value(paper_auc.get(row.label)), paper_delta,
        ])  # fmt: skip
        data.append(_row_data(
            row, ("logloss", "train_samples", "valid_samples", "train_positive_share"), comparison, reference=reference.label,
            paper_stage=stage, train_samples_change=samples_change, paper_train_samples_change=paper_samples_change,
        ))  # fmt: skip
    versus = f"vs {ref_label}" if fixed else "vs previous row"
    header = [
        _first_axis_name(plan), "Seeds", "Train samples", f"Train samples {versus}", "Valid samples", "Train pos %", "Val AUC",
        "Common AUC", f"Δ {versus}", "p", "Paper stage", "Paper train samples", f"Paper train samples {versus}",
        "Paper Val AUC", f"Paper Δ {versus}" if fixed else "Paper Δ",
    ]  # fmt: skip
    parts.sections += [basis.above, markdown_table(*_without_empty_columns(header, body)), basis.below]
    parts.sections.append(
        f"Paper numbers: {paper.TABLE6.source}, of the stage whose settings a row ran "
        "(the sample count: the stage whose data settings it ran, at the paper's scale)."
    )
    parts.data["rows"] = data
    parts.data["compared_on"] = basis.metric
    done = [row for row in table_rows if row.stat("auc") and row.stat("train_samples")]
    if done:
        figure = plots.auc_and_samples(
            out / "filtering.png", [r.label for r in done], [r.stat("auc") for r in done], [r.stat("common_auc") for r in done],
            [r.stat("train_samples").mean for r in done], "Validation AUC and training samples per filter setting",
        )  # fmt: skip
        parts.plots.append((figure, (
            "Left: each setting's best validation AUC on its own validation split and on the common evaluation set "
            "(mean over seeds, error bars ± sample std). Right: the training samples its filter kept."
        )))  # fmt: skip
    return parts


def _sensitivity(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Table A1: one axis at a time around the base; AUC per value and its change from the base."""
    parts = _Parts()
    base = rows(plan, cells, axis=None)[0] if plan["grid"] == "one_at_a_time" else None
    basis = _basis(cells, "base")
    detail, summary, panels, data = [], [], {}, []
    for axis in plan["axes"]:
        published = paper.TABLEA1.get(axis["key"])
        name = published.hyperparameter if published else axis["name"]
        axis_rows = rows(plan, cells, axis=axis["name"])
        panel = {"labels": [], "ours": [], "std": [], "paper": []}
        best: Optional[Row] = None
        for row in axis_rows:
            label = row.coords[axis["name"]]
            value = _number(label)
            paper_auc = paper.paper_auc_at(axis["key"], value) if value is not None else None
            comparison = basis.compare(row, base) if base else None
            delta = comparison.mean if comparison else None
            paper_delta = None if paper_auc is None or published is None else paper_auc - published.auc_by_value[published.best]
            stat = row.stat("auc")
            if stat and (best is None or stat.mean > best.stat("auc").mean):
                best = row
            detail.append([
                name, label, str(len(row.cells)), fmt_stat(stat), fmt_stat(row.stat("common_auc")), fmt_delta(comparison) if base else NA,
                fmt_p(comparison), fmt_value(paper_auc), fmt_bp(paper_delta),
            ])  # fmt: skip
            panel["labels"].append(label)
            panel["ours"].append(None if delta is None else delta * 1e4)
            panel["std"].append(comparison.std * 1e4 if comparison and comparison.std else None)
            panel["paper"].append(None if paper_delta is None else paper_delta * 1e4)
            data.append(_row_data(row, ("logloss",), comparison, hyperparameter=name, paper_auc=paper_auc))
        means = [row.stat("auc").mean for row in axis_rows if row.stat("auc")]
        summary.append([
            name, ", ".join(axis["labels"]), best.coords[axis["name"]] if best else NA,
            fmt_range(means) if means else NA,
            f"{published.best:g}" if published else NA,
            fmt_range(list(published.auc_by_value.values())) if published else NA,
            published.sensitivity if published else NA,
        ])  # fmt: skip
        if all(v is not None for v in panel["ours"]):
            panels[name] = panel
    parts.sections += [basis.above, markdown_table(["Hyperparameter", "Value", "Seeds", "Val AUC", "Common AUC", "Δ vs base", "p", "Paper Val AUC", "Paper Δ vs paper's best"], detail), basis.below]
    parts.sections.append(markdown_table(["Hyperparameter", "Values tested", "Best value", "AUC range", "Paper best value", "Paper AUC range", "Paper sensitivity"], summary))
    parts.sections.append(f"Base: the study's base config (the paper's settings). Paper numbers: {paper.TABLEA1_SOURCE}.")
    parts.data["rows"] = data
    parts.data["compared_on"] = basis.metric
    if panels:
        figure = plots.sensitivity_curves(out / "sensitivity.png", panels, "Sensitivity: Δ validation AUC from the base setting")
        parts.plots.append((figure, (
            f"Each hyperparameter's values against the base (the paper's setting): our paired Δ on the {_basis_name(basis)} "
            "(mean over seeds, error bars ± sample std), and the paper's Δ from its best value (Table A1)."
        )))  # fmt: skip
    return parts


def _number(label: str) -> Optional[float]:
    try:
        return float(label)
    except ValueError:
        return None


def _scaling_data(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Validation AUC against the amount of training data."""
    parts = _Parts()
    table_rows = rows(plan, cells)
    reference = next((r for r in table_rows if r.label == plan["report"]["reference"]), table_rows[0])
    basis = _basis(cells, reference.label)
    comparisons = [basis.compare(row, reference) for row in table_rows]
    body = [
        [row.label, str(len(row.cells)), fmt_count(_mean(row.stat("train_samples"))), fmt_stat(row.stat("auc")),
         fmt_stat(row.stat("logloss"), 3), fmt_stat(row.stat("common_auc")), fmt_delta(comparison),
         fmt_p(comparison), fmt_count(_mean(row.stat("samples_per_sec")))]
        for row, comparison in zip(table_rows, comparisons)
    ]  # fmt: skip
    parts.sections.append(
        "A user fraction keeps that share of the users, so each row's Val AUC is on its own users' last day: "
        "the smaller the fraction, the smaller (and noisier) its validation set. " + basis.above
    )
    header = [_first_axis_name(plan), "Seeds", "Train samples", "Val AUC", "Log Loss (best epoch)", "Common AUC", f"Δ vs {reference.label}", "p", "Samples/s"]
    parts.sections += [markdown_table(header, body), basis.below]
    parts.data["rows"] = [_row_data(row, ("logloss", "train_samples", "samples_per_sec"), c) for row, c in zip(table_rows, comparisons)]
    parts.data["compared_on"] = basis.metric
    done = [row for row in table_rows if row.stat("auc") and row.stat("train_samples")]
    if done:
        figure = plots.auc_vs_samples(
            out / "scaling_data.png", [row.stat("train_samples").mean for row in done], [row.stat("auc") for row in done],
            [row.stat("common_auc") for row in done], [row.label for row in done], "Validation AUC vs training samples",
        )  # fmt: skip
        parts.plots.append((figure, (
            "Best validation AUC against the training samples of each user fraction (log scale), on each row's own "
            "validation split and on the common evaluation set; mean over seeds, error bars ± sample std."
        )))  # fmt: skip
    return parts


def _scaling_world(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Throughput, speedup and parallel efficiency (samples/s per rank over the smallest run's)."""
    parts = _Parts()
    table_rows = sorted((row for row in rows(plan, cells) if row.stat("samples_per_sec")), key=lambda r: r.world_size)
    if not table_rows:
        parts.sections.append("No cell has finished yet.")
        return parts
    first = table_rows[0]
    basis = _basis(cells, f"{first.world_size} rank(s)")
    base_rate = first.stat("samples_per_sec").mean / first.world_size
    body, data, efficiency = [], [], []
    for row in table_rows:
        rate = row.stat("samples_per_sec").mean
        eff = rate / (row.world_size * base_rate)
        efficiency.append(eff)
        comparison = basis.compare(row, first)
        body.append([str(row.world_size), str(len(row.cells)), fmt_stat(row.stat("samples_per_sec"), 0), f"{rate / (first.stat('samples_per_sec').mean):.2f}x",
                     f"{eff:.2f}", fmt_stat(row.stat("auc")), fmt_delta(comparison), fmt_p(comparison),
                     fmt_stat(row.stat("wall_seconds"), 1)])  # fmt: skip
        data.append(_row_data(row, ("samples_per_sec", "wall_seconds"), comparison, world_size=row.world_size, efficiency=eff))
    header = ["Ranks", "Seeds", "Samples/s", f"Speedup vs {first.world_size}", "Parallel efficiency", "Val AUC", f"Δ vs {first.world_size}", "p", WALL]
    parts.sections += [markdown_table(header, body), basis.below]
    parts.sections.append(f"Samples/s: training samples over {WALL}. {WALL_NOTE}")
    parts.data["rows"] = data
    figure = plots.throughput_vs_world(
        out / "scaling_world.png", [r.world_size for r in table_rows], [r.stat("samples_per_sec").mean for r in table_rows], efficiency,
        "Training throughput and parallel efficiency",
    )  # fmt: skip
    parts.plots.append((figure, (
        f"Left: training samples/s (mean over seeds) against ranks, and the linear scaling of the smallest run. "
        f"Right: parallel efficiency, samples/s per rank over the smallest run's. Samples/s: samples over {WALL}."
    )))  # fmt: skip
    return parts


KINDS: Dict[str, Callable[[Dict[str, Any], Dict[str, CellRecord], Path], _Parts]] = {
    "models": _models,
    "filtering": _filtering,
    "sensitivity": _sensitivity,
    "scaling_data": _scaling_data,
    "scaling_world": _scaling_world,
}


def _curves(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> Optional[Tuple[Path, str]]:
    curves = {}
    for row in rows(plan, cells):
        means = _epoch_means(row)
        if means:
            curves[row.label] = {
                "epoch": list(means),
                "auc": [m["auc"] for m in means.values()],
                "auc_std": [m["auc_std"] for m in means.values()],
                "train_auc": [m["train_auc"] for m in means.values()],
            }
    if not curves:
        return None
    figure = plots.epoch_curves(out / "curves.png", curves, "Per-epoch AUC (mean over seeds)")
    return figure, (
        "Validation AUC (solid; band: ± sample std over seeds) and train AUC (dashed, where recorded) of each row after "
        "every epoch, on each row's own validation split."
    )


def _cells_table(cells: Dict[str, CellRecord]) -> str:
    body = [
        [c.id, str(c.seed), str(c.world_size), c.state, fmt_value(c.metric("auc")), fmt_value(c.metric("common_auc")),
         fmt_value(c.metric("wall_seconds"), 1), (c.error or "").replace("|", "/")]
        for c in cells.values()
    ]  # fmt: skip
    return markdown_table(["Cell", "Seed", "Ranks", "State", "Val AUC", "Common AUC", WALL, "Error"], body) + f"\n\n{WALL_NOTE}"


def write_report(directory: str | Path) -> Report:
    """Build the report of the study in `directory`; write DIR/report/<name>.md, .json and PNGs."""
    study_dir = StudyDir(directory)
    plan = study_dir.read_plan()
    cells = load_cells(study_dir, plan)
    out = study_dir.report
    out.mkdir(parents=True, exist_ok=True)
    parts = KINDS[plan["report"]["kind"]](plan, cells, out)
    curves = _curves(plan, cells, out)
    if curves:
        parts.plots.append(curves)
    done = sum(c.state == "done" for c in cells.values())
    lines = [
        f"# {plan['title'] or plan['name']}",
        "",
        f"Study `{plan['name']}` ({plan['study_file']}{', overrides: ' + ' '.join(plan['overrides']) if plan['overrides'] else ''}): "
        f"{done} of {len(cells)} cells done, seeds {', '.join(map(str, plan['seeds']))}. "
        "Ours: mean ± sample std over seeds; Val AUC is the best epoch's on the cell's own validation split, "
        "Common AUC that epoch's checkpoint on the study's common evaluation set.",
        "",
    ]
    for section in parts.sections:
        lines += [section, ""]
    for path, caption in parts.plots:
        lines += [f"![{path.stem}]({path.name})", "", f"*{path.name}: {caption}*", ""]
    lines += ["## Cells", "", _cells_table(cells), ""]
    markdown = "\n".join(lines)
    data = {
        "study": plan["name"],
        "title": plan["title"],
        "kind": plan["report"]["kind"],
        **parts.data,
        "plots": [str(p) for p, _ in parts.plots],
        "cells": {c.id: {"seed": c.seed, "world_size": c.world_size, "state": c.state, "auc": c.metric("auc"), "common_auc": c.metric("common_auc"), "error": c.error} for c in cells.values()},
    }
    (out / f"{plan['name']}.md").write_text(markdown)
    write_json(out / f"{plan['name']}.json", data)
    return Report(markdown, data)
