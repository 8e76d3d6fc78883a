"""The report's PNG plots (matplotlib, no display needed). Each takes plain numbers, so the
report decides what is plotted and these only draw it."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mdaf_dist.analysis.plots import save_figure  # chooses matplotlib's file-only backend

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

DPI = 110


def _errorbar_kwargs(std: Sequence[Optional[float]]) -> Dict:
    return {"yerr": [s or 0.0 for s in std], "capsize": 3} if any(s for s in std) else {}


def auc_vs_samples(path: Path, samples: List[float], auc: List[float], std: List[Optional[float]], labels: List[str], title: str) -> Path:
    """Validation AUC against training samples (log scale): scaling_data."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(samples, auc, marker="o", **_errorbar_kwargs(std))
    for x, y, label in zip(samples, auc, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(samples, [f"{x:,.0f}" for x in samples], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training samples")
    ax.set_ylabel("validation AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path, DPI)


def auc_and_samples(path: Path, labels: List[str], auc: List[float], std: List[Optional[float]], samples: List[float], title: str) -> Path:
    """Validation AUC (bars) and training samples (line, right axis) per filter setting."""
    fig, ax = plt.subplots(figsize=(7, 4))
    positions = range(len(labels))
    ax.bar(positions, auc, color="tab:blue", alpha=0.7, **_errorbar_kwargs(std))
    ax.set_ylabel("validation AUC", color="tab:blue")
    low = min(a - (s or 0.0) for a, s in zip(auc, std))
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(auc) + 0.05))
    ax.set_xticks(list(positions), labels, rotation=15, ha="right", fontsize=8)
    twin = ax.twinx()
    twin.plot(list(positions), samples, color="tab:orange", marker="o")
    twin.set_ylabel("training samples", color="tab:orange")
    twin.set_ylim(0, max(samples) * 1.15)
    ax.set_title(title)
    return save_figure(fig, path, DPI)


def throughput_vs_world(path: Path, ranks: List[int], samples_per_sec: List[float], efficiency: List[float], title: str) -> Path:
    """Samples/s (with the ideal linear line) and parallel efficiency against world size."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(ranks, samples_per_sec, marker="o", label="measured")
    left.plot(ranks, [samples_per_sec[0] * r / ranks[0] for r in ranks], linestyle="--", color="gray", label="linear")
    left.set_xlabel("ranks")
    left.set_ylabel("training samples/s")
    left.set_xticks(ranks)
    left.legend()
    right.plot(ranks, efficiency, marker="o", color="tab:green")
    right.axhline(1.0, linestyle="--", color="gray")
    right.set_ylim(0, max(1.1, max(efficiency) * 1.1))
    right.set_xlabel("ranks")
    right.set_ylabel("parallel efficiency")
    right.set_xticks(ranks)
    fig.suptitle(title)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path, DPI)


def epoch_curves(path: Path, curves: Dict[str, Dict[str, List[float]]], title: str) -> Path:
    """Per-epoch validation AUC (solid) and train AUC (dashed, where recorded) of each row."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(curve["epoch"], curve["auc"], marker="o", color=color, label=f"{label} (val)")
        train = [(e, a) for e, a in zip(curve["epoch"], curve.get("train_auc", [])) if a is not None]
        if train:
            ax.plot(*zip(*train), marker="x", linestyle="--", color=color, label=f"{label} (train)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("AUC")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, DPI)


def sensitivity_curves(path: Path, panels: Dict[str, Dict[str, List]], title: str) -> Path:
    """One panel per hyperparameter: AUC change from the base setting (bp), ours and the paper's."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        positions = list(range(len(panel["labels"])))
        ax.errorbar(positions, panel["ours"], marker="o", label="ours", **_errorbar_kwargs(panel["std"]))
        paper = [(p, v) for p, v in zip(positions, panel["paper"]) if v is not None]
        if paper:
            ax.plot(*zip(*paper), marker="s", linestyle="--", label="paper")
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xticks(positions, panel["labels"], rotation=30, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("Δ val AUC vs base (bp)", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path, DPI)
