"""What a run reports while it trains: TensorBoard events, a progress bar, structured log lines.

Every rank builds a RunLogger and calls it unconditionally; only rank 0 writes anything, so the
training loop needs no `if rank == 0` branches. Log lines are `key=value` pairs so that they can
be grepped from Slurm or Kubernetes logs, where a progress bar is switched off; they go through
`logging` in the project's one format (mdaf_dist/log.py).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import List, Mapping, Optional, Tuple

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

LOG = logging.getLogger(__name__)


class RunLogger:
    """Rank 0: TensorBoard scalars and histograms under `log_dir` (None: no events), a tqdm bar
    counting samples with samples/s and ETA, and log lines on stderr. Other ranks: nothing."""

    def __init__(
        self,
        log_dir: Optional[str],
        rank: int,
        total_steps: Optional[int],
        samples_per_step: int,
        enabled_progress: bool = True,
        start_step: int = 0,
    ) -> None:
        """`start_step`: the step a resumed run starts after. Its TensorBoard writer purges the
        events a killed run wrote past that step (they are trained again), so the curves have
        neither duplicated nor backward steps; the events at that step, such as the validation
        metrics logged before its checkpoint, stay."""
        self.active = rank == 0
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.enabled_progress = enabled_progress
        self._writer: Optional[SummaryWriter] = None
        self._bar: Optional[tqdm] = None
        # (step, time) of the previous `step` call: samples/s is measured between calls, so it is
        # right whether the loop reports every step or every log_every steps, and after a resume.
        self._previous: Optional[Tuple[int, float]] = None
        if self.active and log_dir is not None:
            purge_step = start_step + 1 if start_step > 0 else None
            self._writer = SummaryWriter(log_dir=log_dir, flush_secs=30, purge_step=purge_step)

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        """Report training progress at global step `step` (steps completed so far)."""
        if not self.active:
            return
        now = time.perf_counter()
        samples_per_sec = None
        if self._previous is not None and step > self._previous[0]:
            previous_step, previous_time = self._previous
            samples_per_sec = (step - previous_step) * self.samples_per_step / (now - previous_time)
        self._previous = (step, now)

        values = {k: float(v) for k, v in scalars.items()}
        if samples_per_sec is not None:
            values["samples_per_sec"] = samples_per_sec
        self.scalars(step, values, prefix="train")

        if self.enabled_progress:
            self._advance_bar(step, values)
        else:
            eta = _eta(step, self.total_steps, samples_per_sec, self.samples_per_step)
            self.info(" ".join([_step_field(step, self.total_steps)] + _fields(values) + eta))

    def scalars(self, step: int, values: Mapping[str, object], prefix: str) -> None:
        """TensorBoard scalars `prefix/name`; nested dicts (e.g. gate_by_hist_len) become
        `prefix/name/key`."""
        if self._writer is None:
            return
        for name, value in values.items():
            tag = f"{prefix}/{name}"
            if isinstance(value, Mapping):
                self.scalars(step, value, tag)
            else:
                self._writer.add_scalar(tag, float(value), step)

    def histogram(self, step: int, name: str, values) -> None:
        if self._writer is None:
            return
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size:  # TensorBoard cannot bin an empty array
            self._writer.add_histogram(name, values, step)

    def info(self, msg: str) -> None:
        """One log line (stderr, above the progress bar, not through it)."""
        if self.active:
            LOG.info(msg)

    def close(self, step: Optional[int] = None) -> None:
        """`step`: the run's last step. The bar moves to it (the loop reports every log_every
        steps only) and, when the run stopped before its planned total (early stopping), ends
        there: a finished run's bar reads 100 %."""
        if self._bar is not None:
            if step is not None:
                self._bar.total = step
                self._bar.update(step - self._bar.n)
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _advance_bar(self, step: int, values: Mapping[str, float]) -> None:
        if self._bar is None:
            # unit_scale counts samples, so tqdm itself shows samples/s and the ETA
            self._bar = tqdm(
                total=self.total_steps,
                initial=step,
                unit="samples",
                unit_scale=self.samples_per_step,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        shown = {k: f"{v:.4g}" for k, v in values.items() if k != "samples_per_sec"}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)


def _step_field(step: int, total_steps: Optional[int]) -> str:
    return f"step={step}" if total_steps is None else f"step={step}/{total_steps}"


def _fields(values: Mapping[str, float]) -> List[str]:
    return [f"{name}={value:.6g}" for name, value in values.items()]


def _eta(step: int, total_steps: Optional[int], samples_per_sec: Optional[float], per_step: int) -> List[str]:
    if total_steps is None or not samples_per_sec or not math.isfinite(samples_per_sec):
        return []
    seconds = max(total_steps - step, 0) * per_step / samples_per_sec
    return [f"eta={timedelta(seconds=round(seconds))}"]
