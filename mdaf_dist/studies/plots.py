"""The report's PNG plots (matplotlib, no display needed). Each takes plain numbers (a metric's
values over a row's seeds as a `Stat`), so the report decides what is plotted and these only
draw it. Legends stand outside the data; error bars and bands are ± the sample std over seeds
(none with one seed), as each axis label says; each plot's caption is the report's
(`CAPTIONS`)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mdaf_dist.analysis.plots import save_figure  # chooses matplotlib's file-only backend

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from mdaf_dist.studies.results import Stat  # noqa: E402

DPI = 110
SPREAD = "error bars: ± sample std over seeds"


def _outside_legend(ax: "plt.Axes") -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _errorbar(ax: "plt.Axes", x: Sequence[float], stats: Sequence[Optional[Stat]], **kwargs) -> None:
    """Means with ± std error bars, skipping rows without the metric."""
    points = [(x_, s) for x_, s in zip(x, stats) if s is not None]
    if points:
        xs, ss = zip(*points)
        ax.errorbar(xs, [s.mean for s in ss], yerr=[s.std or 0.0 for s in ss], capsize=3, marker="o", **kwargs)


def auc_vs_samples(path: Path, samples: List[float], own: List[Stat], common: List[Optional[Stat]], labels: List[str], title: str) -> Path:
    """Validation AUC (own validation set and the common one) against training samples (log scale): scaling_data."""
    # left to right, so the line joins neighbours in training samples
    samples, own, common, labels = (list(v) for v in zip(*sorted(zip(samples, own, common, labels), key=lambda point: point[0])))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    _errorbar(ax, samples, own, label="own validation set")
    _errorbar(ax, samples, common, label="common evaluation set", linestyle="--")
    for x, stat, label in zip(samples, own, labels):
        ax.annotate(label, (x, stat.mean), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(samples, [f"{x:,.0f}" for x in samples], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training samples (log scale)")
    ax.set_ylabel(f"validation AUC\n({SPREAD})")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _outside_legend(ax)
    return save_figure(fig, path, DPI)


def auc_and_samples(path: Path, labels: List[str], own: List[Stat], common: List[Optional[Stat]], samples: List[float], title: str) -> Path:
    """Per filter setting: validation AUC, own and common, as points (left), and training samples
    as bars from zero (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    positions = list(range(len(labels)))
    _errorbar(left, positions, own, label="own validation set", linestyle="none")
    _errorbar(left, [p + 0.1 for p in positions], common, label="common evaluation set", linestyle="none")
    left.set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    left.set_ylabel(f"validation AUC\n({SPREAD})")
    left.grid(True, axis="y", alpha=0.3)
    left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=8, frameon=False)
    right.bar(positions, samples, color="tab:gray")
    right.set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("training samples")
    right.set_ylim(0, max(samples) * 1.1)
    right.set_title("training samples", fontsize=9)
    fig.suptitle(title)
    return save_figure(fig, path, DPI)


def throughput_vs_world(path: Path, ranks: List[int], samples_per_sec: List[float], efficiency: List[float], title: str) -> Path:
    """Samples/s (with the ideal linear line) and parallel efficiency against world size."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(ranks, samples_per_sec, marker="o", label="measured (mean over seeds)")
    left.plot(ranks, [samples_per_sec[0] * r / ranks[0] for r in ranks], linestyle="--", color="gray", label="linear from the smallest run")
    left.set_xlabel("ranks")
    left.set_ylabel("training samples/s")
    left.set_ylim(0, None)
    left.set_xticks(ranks)
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8, frameon=False)
    right.plot(ranks, efficiency, marker="o", color="tab:green")
    right.axhline(1.0, linestyle="--", color="gray")
    right.set_ylim(0, max(1.1, max(efficiency) * 1.1))
    right.set_xlabel("ranks")
    right.set_ylabel("parallel efficiency (1 = linear)")
    right.set_xticks(ranks)
    fig.suptitle(title)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path, DPI)


def epoch_curves(path: Path, curves: Dict[str, Dict[str, List]], title: str) -> Path:
    """Per row: validation AUC per epoch (solid, a band of ± std over seeds) and train AUC
    (dashed, where recorded)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(curve["epoch"], curve["auc"], marker="o", color=color, label=f"{label} (val)")
        band = [(e, m - s, m + s) for e, m, s in zip(curve["epoch"], curve["auc"], curve["auc_std"]) if m is not None and s is not None]
        if band:
            epochs, low, high = zip(*band)
            ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)
        train = [(e, a) for e, a in zip(curve["epoch"], curve.get("train_auc", [])) if a is not None]
        if train:
            ax.plot(*zip(*train), marker="x", linestyle="--", color=color, label=f"{label} (train)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("AUC (mean over seeds;\nband: ± sample std of val AUC)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _outside_legend(ax)
    return save_figure(fig, path, DPI)


def sensitivity_curves(path: Path, panels: Dict[str, Dict[str, List]], title: str) -> Path:
    """One panel per hyperparameter: AUC change from the base setting (bp), ours and the paper's."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        positions = list(range(len(panel["labels"])))
        ax.errorbar(positions, panel["ours"], yerr=[s or 0.0 for s in panel["std"]], capsize=3, marker="o", label="ours (± std of the paired Δ over seeds)")
        paper = [(p, v) for p, v in zip(positions, panel["paper"]) if v is not None]
        if paper:
            ax.plot(*zip(*paper), marker="s", linestyle="--", label="paper (Δ from its best value)")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xticks(positions, panel["labels"], rotation=30, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("Δ val AUC vs base (bp)", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.3), fontsize=7, frameon=False)
    fig.suptitle(title)
    return save_figure(fig, path, DPI)
