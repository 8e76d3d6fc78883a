"""PNG figures of the gate analysis, with matplotlib's file-only backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mdaf_dist.analysis.gate_tables import PAPER_TABLE4, PAPER_TABLEB2  # noqa: E402
from mdaf_dist.train.metrics import SEQUENCE_LENGTH_GROUPS  # noqa: E402

PAPER_MEAN = dict((key, value) for _, key, value in PAPER_TABLE4)["gate_mean"]


def gate_histogram(gates: np.ndarray, path: Path) -> Path:
    """Histogram of the gate over the scored samples, our mean and the paper's (Table 4) marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(gates, bins=50, color="tab:blue", alpha=0.8)
    ax.axvline(float(np.mean(gates)), color="tab:red", label=f"ours: mean {np.mean(gates):.4f}")
    ax.axvline(PAPER_MEAN, color="black", linestyle="--", label=f"paper: mean {PAPER_MEAN:.4f}")
    ax.set_xlabel("gate g (weight of the sequential branch)")
    ax.set_ylabel("samples")
    ax.set_title(f"Gate distribution ({len(gates):,} samples)")
    ax.legend()
    return save_figure(fig, path)


def gate_by_history_length(gates: np.ndarray, hist_len: np.ndarray, path: Path) -> Path:
    """Mean gate (+- std) at every history length, with the paper's Table B2 group means."""
    lengths = np.unique(hist_len)
    means = np.array([gates[hist_len == n].mean() for n in lengths])
    stds = np.array([gates[hist_len == n].std() for n in lengths])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(lengths, means - stds, means + stds, color="tab:blue", alpha=0.2)
    ax.plot(lengths, means, color="tab:blue", marker=".", label="ours: mean +- std")
    paper_x: List[float] = [(low + high) / 2 for low, high in SEQUENCE_LENGTH_GROUPS]
    ax.plot(paper_x, [mean for _, _, mean in PAPER_TABLEB2], "k--s", label="paper (Table B2)")
    ax.set_xlabel("history length (clicks the model saw)")
    ax.set_ylabel("gate g")
    ax.set_title("Gate vs history length")
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig: "plt.Figure", path: Path, dpi: int = 100) -> Path:
    """Lay out, write and close a figure (closing frees it: reports draw many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
