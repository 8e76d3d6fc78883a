"""The progress line a running study prints whenever a cell changes state:

    [3/8 done, 1 running, 0 failed, 4 pending]  ETA 2m05s  (done: fusion-gate_seed-1 in 41 s)

ETA: the mean time of the cells finished in this run, times the cells left, over the cells
that run at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, TextIO


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class Progress:
    total: int
    parallel: int
    stream: TextIO = sys.stdout
    done: int = 0
    failed: int = 0
    running: int = 0
    seconds: List[float] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed - self.running

    def eta(self) -> str:
        if not self.seconds:
            return "?"
        left = self.pending + self.running
        return duration(sum(self.seconds) / len(self.seconds) * left / max(1, min(self.parallel, left or 1)))

    def show(self, event: str) -> None:
        print(
            f"[{self.done}/{self.total} done, {self.running} running, {self.failed} failed, {self.pending} pending]"
            f"  ETA {self.eta()}  ({event})",
            file=self.stream,
            flush=True,
        )
