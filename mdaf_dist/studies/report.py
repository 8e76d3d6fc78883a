"""`mdaf study report DIR`: a study's table in the paper's shape, the paper's numbers beside ours,
and its plots, as DIR/report/<study>.md (+ .json, + PNGs).

Numbers are written as the paper writes them: AUC to 4 places, log loss to 3, differences in
basis points (1bp = 0.0001 AUC). Ours are mean ± sample std over seeds (just the mean for one
seed). A metric a run did not record is "n/a". Every number of ours comes from the cells'
results.json and their data's meta.json (`results`); the paper's from `paper`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from mdaf_dist.analysis.dynamics import table7
from mdaf_dist.analysis.report import markdown_table
from mdaf_dist.studies import paper, plots
from mdaf_dist.studies.results import CellRecord, Row, Stat, load_cells, rows
from mdaf_dist.files import write_json
from mdaf_dist.studies.workdir import StudyDir

NA = "n/a"


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


def _delta(row: Row, reference: Row) -> Optional[float]:
    ours, ref = _mean(row.stat("auc")), _mean(reference.stat("auc"))
    return None if ours is None or ref is None else ours - ref


def _row_data(row: Row, metrics: Sequence[str], **extra: Any) -> Dict[str, Any]:
    stats = {m: row.stat(m) for m in metrics}
    return {
        "label": row.label,
        "coords": row.coords,
        "cells": [cell.id for cell in row.cells],
        **{m: (s.as_dict() if s else None) for m, s in stats.items()},
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
    plots: List[Path] = field(default_factory=list)


def _first_axis_name(plan: Dict[str, Any]) -> str:
    return plan["axes"][0]["name"] if len(plan["axes"]) == 1 else "Setting"


def _models(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Tables 2 and 3: AUC and log loss per model/variant, the difference from a reference row."""
    parts = _Parts()
    table = paper.TABLES.get(plan["report"]["paper"])
    table_rows = rows(plan, cells)
    ref_label = plan["report"]["reference"] or table_rows[0].label
    reference = next((r for r in table_rows if r.label == ref_label), table_rows[0])
    body, data = [], []
    for row in table_rows:
        published = table.rows.get(row.label) if table else None
        delta = _delta(row, reference)
        body.append([
            row.label, str(len(row.cells)), fmt_stat(row.stat("auc")), fmt_stat(row.stat("logloss"), 3),
            "baseline" if row is reference else fmt_bp(delta), fmt_stat(row.stat("test_auc")),
            fmt_value(published.auc if published else None), fmt_value(published.logloss if published else None, 3),
            fmt_paper_bp(published.delta_bp) if published else NA,
        ])  # fmt: skip
        data.append(_row_data(row, ("auc", "logloss", "test_auc", "train_auc"), delta_auc=delta, paper=published.__dict__ if published else None))
    header = [_first_axis_name(plan), "Seeds", "Val AUC", "Log Loss", f"Δ vs {reference.label}", "Test AUC", "Paper Val AUC", "Paper Log Loss", f"Paper Δ vs {table.reference if table else NA}"]
    parts.sections.append(markdown_table(header, body))
    if table:
        parts.sections.append(f"Paper numbers: {table.source}.")
    parts.data["rows"] = data
    parts.data["reference"] = reference.label
    dynamics = plan["report"].get("dynamics", "")
    row = next((r for r in table_rows if r.label == dynamics), None)
    if row is not None:
        parts.sections.append(_dynamics(row, parts))
    return parts


def _epoch_means(row: Row) -> Dict[int, Dict[str, Optional[float]]]:
    """Per epoch: the mean over the row's seeds of val AUC, log loss and train AUC."""
    by_epoch: Dict[int, Dict[str, List[float]]] = {}
    for cell in row.cells:
        for evaluation in cell.curve():
            slot = by_epoch.setdefault(int(evaluation["epoch"]), {"auc": [], "logloss": [], "train_auc": []})
            for key in slot:
                if evaluation.get(key) is not None:
                    slot[key].append(float(evaluation[key]))
    return {epoch: {k: (sum(v) / len(v) if v else None) for k, v in values.items()} for epoch, values in sorted(by_epoch.items())}


def _dynamics(row: Row, parts: _Parts) -> str:
    """Table 7 (the analysis module's table, the paper's epochs beside ours) of one row, its
    per-epoch numbers the means over the row's seeds."""
    means = _epoch_means(row)
    parts.data["dynamics"] = {"label": row.label, "epochs": means}
    evaluations = [{"epoch": epoch, **values} for epoch, values in means.items() if values["auc"] is not None]
    return f"Training dynamics of {row.label} (mean over {len(row.cells)} seed(s)):\n\n{table7(evaluations).markdown()}"


def _filtering(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Table 6 and filter scaling: training samples (from prepare's meta.json) and AUC per setting."""
    parts = _Parts()
    table = paper.TABLES.get(plan["report"]["paper"])
    table_rows = rows(plan, cells)
    body, data = [], []
    for i, row in enumerate(table_rows):
        published = table.rows.get(row.label) if table else None
        delta = _delta(row, table_rows[i - 1]) if i else None
        share = _mean(row.stat("train_positive_share"))
        body.append([
            row.label, str(len(row.cells)), fmt_count(_mean(row.stat("train_samples"))), fmt_count(_mean(row.stat("valid_samples"))),
            NA if share is None else f"{100 * share:.1f}", fmt_stat(row.stat("auc")), "baseline" if i == 0 else fmt_bp(delta),
            fmt_count(published.train_samples if published else None), fmt_value(published.auc if published else None),
            (fmt_paper_bp(published.delta_bp) if published else NA),
        ])  # fmt: skip
        data.append(_row_data(row, ("auc", "logloss", "train_samples", "valid_samples", "train_positive_share"), delta_auc_vs_previous=delta))
    header = [_first_axis_name(plan), "Seeds", "Train samples", "Valid samples", "Train pos %", "Val AUC", "Δ vs previous row", "Paper train samples", "Paper Val AUC", "Paper Δ"]
    parts.sections.append(markdown_table(header, body))
    if table:
        parts.sections.append(f"Paper numbers: {table.source}.")
    parts.data["rows"] = data
    done = [row for row in table_rows if row.stat("auc") and row.stat("train_samples")]
    if done:
        parts.plots.append(plots.auc_and_samples(
            out / "filtering.png", [r.label for r in done], [r.stat("auc").mean for r in done], [r.stat("auc").std for r in done],
            [r.stat("train_samples").mean for r in done], "Validation AUC and training samples per filter setting",
        ))  # fmt: skip
    return parts


def _sensitivity(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Table A1: one axis at a time around the base; AUC per value and its change from the base."""
    parts = _Parts()
    base = rows(plan, cells, axis=None)[0] if plan["grid"] == "one_at_a_time" else None
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
            delta = _delta(row, base) if base else None
            paper_delta = None if paper_auc is None or published is None else paper_auc - published.auc_by_value[published.best]
            stat = row.stat("auc")
            if stat and (best is None or stat.mean > best.stat("auc").mean):
                best = row
            detail.append([name, label, str(len(row.cells)), fmt_stat(stat), fmt_bp(delta), fmt_value(paper_auc), fmt_bp(paper_delta)])
            panel["labels"].append(label)
            panel["ours"].append(None if delta is None else delta * 1e4)
            panel["std"].append(stat.std * 1e4 if stat and stat.std else None)
            panel["paper"].append(None if paper_delta is None else paper_delta * 1e4)
            data.append(_row_data(row, ("auc", "logloss"), hyperparameter=name, delta_auc_vs_base=delta, paper_auc=paper_auc))
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
    parts.sections.append(markdown_table(["Hyperparameter", "Value", "Seeds", "Val AUC", "Δ vs base", "Paper Val AUC", "Paper Δ vs paper's best"], detail))
    parts.sections.append(markdown_table(["Hyperparameter", "Values tested", "Best value", "AUC range", "Paper best value", "Paper AUC range", "Paper sensitivity"], summary))
    parts.sections.append(f"Base: the study's base config (the paper's settings). Paper numbers: {paper.TABLEA1_SOURCE}.")
    parts.data["rows"] = data
    if panels:
        parts.plots.append(plots.sensitivity_curves(out / "sensitivity.png", panels, "Sensitivity: Δ validation AUC from the base setting"))
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
    body = [
        [row.label, str(len(row.cells)), fmt_count(_mean(row.stat("train_samples"))), fmt_stat(row.stat("auc")),
         fmt_stat(row.stat("logloss"), 3), fmt_count(_mean(row.stat("samples_per_sec")))]
        for row in table_rows
    ]  # fmt: skip
    parts.sections.append(markdown_table([_first_axis_name(plan), "Seeds", "Train samples", "Val AUC", "Log Loss", "Samples/s"], body))
    parts.sections.append(
        "A user fraction keeps that share of the users, so each row is validated on its own users' last day: "
        "the smaller the fraction, the smaller (and noisier) its validation set."
    )
    parts.data["rows"] = [_row_data(row, ("auc", "logloss", "train_samples", "samples_per_sec")) for row in table_rows]
    done = [row for row in table_rows if row.stat("auc") and row.stat("train_samples")]
    if done:
        parts.plots.append(plots.auc_vs_samples(
            out / "scaling_data.png", [row.stat("train_samples").mean for row in done], [row.stat("auc").mean for row in done],
            [row.stat("auc").std for row in done], [row.label for row in done], "Validation AUC vs training samples",
        ))  # fmt: skip
    return parts


def _scaling_world(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> _Parts:
    """Throughput, speedup and parallel efficiency (samples/s per rank over the smallest run's)."""
    parts = _Parts()
    table_rows = sorted((row for row in rows(plan, cells) if row.stat("samples_per_sec")), key=lambda r: r.world_size)
    if not table_rows:
        parts.sections.append("No cell has finished yet.")
        return parts
    first = table_rows[0]
    base_rate = first.stat("samples_per_sec").mean / first.world_size
    body, data, efficiency = [], [], []
    for row in table_rows:
        rate = row.stat("samples_per_sec").mean
        eff = rate / (row.world_size * base_rate)
        efficiency.append(eff)
        body.append([str(row.world_size), str(len(row.cells)), fmt_stat(row.stat("samples_per_sec"), 0), f"{rate / (first.stat('samples_per_sec').mean):.2f}x",
                     f"{eff:.2f}", fmt_stat(row.stat("auc")), fmt_stat(row.stat("wall_seconds"), 1)])  # fmt: skip
        data.append(_row_data(row, ("auc", "samples_per_sec", "wall_seconds"), world_size=row.world_size, efficiency=eff))
    header = ["Ranks", "Seeds", "Samples/s", f"Speedup vs {first.world_size}", "Parallel efficiency", "Val AUC", "Wall s"]
    parts.sections.append(markdown_table(header, body))
    parts.sections.append("Samples/s: training samples over the run's wall time, evaluation and checkpoints included (results.json).")
    parts.data["rows"] = data
    parts.plots.append(plots.throughput_vs_world(
        out / "scaling_world.png", [r.world_size for r in table_rows], [r.stat("samples_per_sec").mean for r in table_rows], efficiency,
        "Training throughput and parallel efficiency",
    ))  # fmt: skip
    return parts


KINDS: Dict[str, Callable[[Dict[str, Any], Dict[str, CellRecord], Path], _Parts]] = {
    "models": _models,
    "filtering": _filtering,
    "sensitivity": _sensitivity,
    "scaling_data": _scaling_data,
    "scaling_world": _scaling_world,
}


def _curves(plan: Dict[str, Any], cells: Dict[str, CellRecord], out: Path) -> Optional[Path]:
    curves = {}
    for row in rows(plan, cells):
        means = _epoch_means(row)
        if means:
            curves[row.label] = {
                "epoch": list(means),
                "auc": [m["auc"] for m in means.values()],
                "train_auc": [m["train_auc"] for m in means.values()],
            }
    if not curves:
        return None
    return plots.epoch_curves(out / "curves.png", curves, "Per-epoch AUC (mean over seeds)")


def _cells_table(cells: Dict[str, CellRecord]) -> str:
    body = [
        [c.id, str(c.seed), str(c.world_size), c.state, fmt_value(c.metric("auc")), fmt_value(c.metric("wall_seconds"), 1), (c.error or "").replace("|", "/")]
        for c in cells.values()
    ]
    return markdown_table(["Cell", "Seed", "Ranks", "State", "Val AUC", "Wall s", "Error"], body)


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
        "Ours: mean ± std over seeds; Val AUC is the best epoch's.",
        "",
    ]
    for section in parts.sections:
        lines += [section, ""]
    for path in parts.plots:
        lines += [f"![{path.stem}]({path.name})", ""]
    lines += ["## Cells", "", _cells_table(cells), ""]
    markdown = "\n".join(lines)
    data = {
        "study": plan["name"],
        "title": plan["title"],
        "kind": plan["report"]["kind"],
        **parts.data,
        "plots": [str(p) for p in parts.plots],
        "cells": {c.id: {"seed": c.seed, "world_size": c.world_size, "state": c.state, "auc": c.metric("auc"), "error": c.error} for c in cells.values()},
    }
    (out / f"{plan['name']}.md").write_text(markdown)
    write_json(out / f"{plan['name']}.json", data)
    return Report(markdown, data)
