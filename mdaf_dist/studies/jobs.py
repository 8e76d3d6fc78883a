"""What a scheduler says about a cell's job, in the scheduler's own words.

TorchX's status is enough for most schedulers, but not for Slurm: its translation knows only the
states it lists and fails on others (`CANCELLED by 0`, what `scancel` leaves in the accounting),
it never says why a job is pending, and it needs Slurm's accounting. For Slurm the study asks
`squeue` (live jobs: state and pending reason) and then `sacct` (finished ones) itself, and maps a
state by its first word, an unknown one to FAILED.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Any, List, Optional

from torchx.schedulers.slurm_scheduler import SLURM_STATES
from torchx.specs import AppState, is_terminal, parse_app_handle

from mdaf_dist.errors import UserError, one_line

SLURM = "slurm"
# pending reasons that do not clear by waiting (the job asks for more than the partition has, a
# node that is down or drained, a partition that is down): the job is failed after a timeout
STUCK_REASONS = re.compile(r"^(PartitionConfig|PartitionNodeLimit|PartitionTimeLimit|PartitionDown|PartitionInactive|ReqNodeNotAvail|BadConstraints|NodeDown|InvalidAccount|InvalidQOS)")
# squeue's states of a job whose processes may still run: not finished until squeue lets it go
LIVE_SLURM_STATES = {"CONFIGURING": AppState.PENDING, "COMPLETING": AppState.RUNNING, "STAGE_OUT": AppState.RUNNING, "SIGNALING": AppState.RUNNING}


@dataclass
class JobStatus:
    state: AppState
    # the scheduler's own words for it, e.g. "CANCELLED by 0"
    words: str = ""
    # why a pending job waits, e.g. "PartitionConfig" ("" when the scheduler does not say)
    reason: str = ""
    # what else the scheduler says of it (TorchX's status message)
    message: str = ""

    @property
    def finished(self) -> bool:
        return is_terminal(self.state)

    @property
    def stuck(self) -> bool:
        return self.state == AppState.PENDING and bool(STUCK_REASONS.match(self.reason))


def _slurm(command: List[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"--scheduler slurm: `{command[0]}` is not on PATH: run the study on a host with Slurm's client commands") from None


def check_scheduler(scheduler: str) -> None:
    """Refuse, before anything is submitted, a scheduler the study cannot follow: Slurm without
    accounting (TorchX and the study read finished jobs from `sacct`)."""
    if scheduler != SLURM:
        return
    sacct = _slurm(["sacct", "--noheader", "-X", "--starttime", "now"])
    if sacct.returncode != 0:
        said = (sacct.stderr.strip().splitlines() or ["exit status " + str(sacct.returncode)])[-1]
        raise UserError(f"--scheduler slurm needs Slurm accounting (slurmdbd), but `sacct` says: {said}")


def _slurm_state(words: str, live: bool) -> AppState:
    first = words.split()[0] if words.split() else ""
    if live:
        return LIVE_SLURM_STATES.get(first) or SLURM_STATES.get(first, AppState.RUNNING)
    return SLURM_STATES.get(first, AppState.FAILED)


def _slurm_status(app_id: str) -> Optional[JobStatus]:
    # a heterogeneous job (several nodes) lists one line per component; the first speaks for it
    queue = _slurm(["squeue", "--noheader", "--jobs", app_id, "--format", "%T|%r"])
    if queue.returncode == 0 and queue.stdout.strip():
        words, _, reason = queue.stdout.splitlines()[0].partition("|")
        reason = "" if reason.strip() == "None" else reason.strip()
        return JobStatus(_slurm_state(words, live=True), words.strip(), reason)
    sacct = _slurm(["sacct", "--noheader", "--parsable2", "-X", "--jobs", app_id, "--format", "State"])
    if sacct.returncode != 0 or not sacct.stdout.strip():
        return None
    words = sacct.stdout.splitlines()[0].strip()
    return JobStatus(_slurm_state(words, live=False), words)


def job_status(runner: Any, handle: str) -> Optional[JobStatus]:
    """The job's state, or None when the scheduler does not know it (any more)."""
    scheduler, _, app_id = parse_app_handle(handle)
    if scheduler == SLURM:
        return _slurm_status(app_id)
    try:
        status = runner.status(handle)
    except Exception as e:  # noqa: BLE001 - a state TorchX cannot translate: the job is failed (and cancelled)
        return JobStatus(AppState.FAILED, f"{scheduler} status failed: {one_line(e)}")
    return JobStatus(status.state, status.state.name, message=status.msg.strip()) if status is not None else None
