"""`mdaf study run`: prepare the study's data, then train every cell as a TorchX job.

Each cell is the project's own component (`mdaf_dist/launch.py:train`, loaded by TorchX's
component finder as `torchx run` loads it) submitted through TorchX's Python API
(`get_runner().run`), on `local_cwd` by default or any TorchX scheduler by name, so a study that
outgrows one machine runs on a cluster unchanged: DIR must then be on storage the cluster sees
(prepare runs here, in the study's process, before the jobs are submitted).

After training, every trained cell's best checkpoint is scored on the study's common evaluation
set (studies.common), here in the study's process.

Resumable: a cell with a results.json is skipped (and a scored one is not scored again); a cell
whose job (recorded in status.json) still runs, its study killed, is attached to; any other cell
(new, failed, cancelled, interrupted) is launched with `train.resume=auto`, so an interrupted one
continues from its last checkpoint. A failing cell, or one whose job someone cancelled, is
recorded (status.json, cells/<id>/error.txt, with the scheduler's words: studies.jobs) and the
others go on; a job pending for a reason that waiting does not clear is cancelled after
`pending_timeout` and its cell failed. SIGINT and SIGTERM cancel the running jobs, on every
scheduler, and leave everything for the next run.

Slurm: each cell's job runs in (and logs to) cells/<id>/slurm, named `<study>-<cell>`; jobs on
this file system (local_cwd, Slurm) run the study's own Python, not PATH's `torchrun`.

One study at a time: the study holds a lock on DIR while it runs, and on a cell's directory
while it writes the cell's config and while it records the cell's outcome; in between, the
cell's training job holds it (a run locks its output_dir), so a run started there by hand is
refused, or makes the cell fail, rather than mixing into it. On local_cwd each cell's torchrun
dies with the study (mdaf_dist.distributed.lifetime) and its workers with torchrun, so even a
study killed with SIGKILL leaves nothing running.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from torchx.runner import get_runner
from torchx.runner.config import apply as apply_torchxconfig
from torchx.schedulers.local_scheduler import SignalException
from torchx.specs import AppDef, AppState, parse_app_handle
from torchx.schedulers.api import Stream
from torchx.specs.finder import get_component

import mdaf_dist
from mdaf_dist.config import to_yaml
from mdaf_dist.errors import UserError, one_line
from mdaf_dist.files import DirectoryLock
from mdaf_dist.studies.common import score_cells
from mdaf_dist.studies.datacache import check_input, prepare_cells
from mdaf_dist.studies.grid import Cell, Plan, plan_record
from mdaf_dist.studies.jobs import SLURM, JobStatus, check_scheduler, job_status
from mdaf_dist.studies.progress import Progress, duration
from mdaf_dist.studies.spec import ResourcesSpec, parse_resources
from mdaf_dist.studies.workdir import CELL_CONFIG, ERROR_FILE, StudyDir

COMPONENT_FILE = Path(mdaf_dist.__file__).resolve().with_name("launch.py")
LOCAL_SCHEDULERS = ("local_cwd", "local_docker")
# schedulers that run the job on this file system: it runs this environment's Python (whose bin
# directory need not be on the nodes' PATH), and on Slurm in the cell's directory (its logs too)
HOST_SCHEDULERS = ("local_cwd", SLURM)
SLURM_JOB_DIR = "slurm"
ERROR_TAIL_LINES = 40
# how long cancelled jobs are given to end before the study exits
CANCEL_WAIT_S = 60.0


@dataclass
class LaunchSettings:
    scheduler: str = "local_cwd"
    # TorchX scheduler options as `torchx run -cfg` takes them, e.g. "partition=gpu,time=1:00:00"
    scheduler_args: str = ""
    max_parallel: int = 1
    dryrun: bool = False
    poll_seconds: float = 1.0
    # what each rank asks for, over the study file's: "cpu_per_rank=4,memMB_per_rank=8192"
    resources: str = ""
    # a job pending for a reason that does not clear by waiting (jobs.STUCK_REASONS) is failed after this
    pending_timeout: float = 300.0


@dataclass
class _Running:
    cell: Cell
    app: AppDef
    handle: str
    started: float = field(default_factory=time.monotonic)
    # since when the job has been pending for a reason that does not clear by waiting
    stuck_since: Optional[float] = None


def load_component() -> Callable[..., AppDef]:
    return get_component(f"{COMPONENT_FILE}:train").fn


def _cell_app(component: Callable[..., AppDef], plan: Plan, cell: Cell, config_path: Path, scheduler: str, per_rank: ResourcesSpec) -> AppDef:
    ranks = cell.nproc_per_node
    env = dict(plan.study.file.env)
    app = component(str(config_path), nnodes=cell.nnodes, nproc_per_node=ranks, name=f"mdaf/{cell.id}", env=env or None)
    role = app.roles[0]
    # set here rather than through the component, whose resource() would turn a 0 (ask for
    # nothing: the scheduler's default) into TorchX's default
    role.resource = dataclasses.replace(
        role.resource, cpu=per_rank.cpu_per_rank * ranks, gpu=per_rank.gpu_per_rank * ranks, memMB=per_rank.memMB_per_rank * ranks
    )
    # the scheduler's job name (Slurm's --job-name, its log files' names): the study and the cell
    role.name = f"{plan.study.name}-{cell.id}"
    if scheduler in HOST_SCHEDULERS:
        # dist.ddp runs `bash -c "torchrun ..."`: this environment's torchrun instead of PATH's
        command = role.args[-1]
        role.args[-1] = f"{shlex.quote(sys.executable)} -m torch.distributed.run{command.removeprefix('torchrun')}"
    if scheduler == "local_cwd":
        # local_cwd starts the job from this process, in a session of its own: it must die with it
        role.entrypoint, role.args = sys.executable, ["-m", "mdaf_dist.distributed.lifetime", str(os.getpid()), role.entrypoint, *role.args]
    return app


def _scheduler_cfg(runner: Any, settings: LaunchSettings, study_dir: StudyDir) -> Dict[str, Any]:
    """-cfg style options, then the local schedulers' logs in DIR/torchx, then `.torchxconfig`."""
    try:
        cfg = dict(runner.scheduler_run_opts(settings.scheduler).cfg_from_str(settings.scheduler_args))
    except (KeyError, ValueError) as e:
        raise UserError(f"--scheduler {settings.scheduler} --scheduler-args {settings.scheduler_args!r}: {e}") from None
    if settings.scheduler in LOCAL_SCHEDULERS:
        cfg.setdefault("log_dir", str(study_dir.root / "torchx"))
    apply_torchxconfig(settings.scheduler, cfg)
    return cfg


def _cell_cfg(cfg: Dict[str, Any], scheduler: str, cell_dir: Path) -> Dict[str, Any]:
    """On Slurm each cell's job starts in (and logs to) a directory of the cell's own."""
    if scheduler != SLURM:
        return cfg
    (cell_dir / SLURM_JOB_DIR).mkdir(parents=True, exist_ok=True)
    return {**cfg, "job_dir": str(cell_dir / SLURM_JOB_DIR)}


# what a failed job's log says, most telling first: this project's one-line errors
# ("mdaf train: error: ..."), then a Python exception other than torchrun's wrapper of it
_ERROR_LINES = (
    re.compile(r"(^|[\s:\]])error: \S", re.IGNORECASE),
    re.compile(r"^(\[\d+\]:)?(?!.*ChildFailedError)[\w.]*(Error|Exception): \S"),
)


def _log_lines(runner: Any, running: _Running, cell_dir: Path) -> List[str]:
    """The job's stderr: on Slurm the first node's file in the cell's directory (TorchX's reader
    asks for the job's state first, and fails on the states it cannot translate)."""
    scheduler, _, app_id = parse_app_handle(running.handle)
    role = running.app.roles[0].name
    if scheduler == SLURM:
        path = cell_dir / SLURM_JOB_DIR / f"slurm-{app_id}-{role}-0.err"
        return path.read_text(errors="replace").splitlines() if path.is_file() else []
    try:
        return [line.rstrip("\n") for line in runner.log_lines(running.handle, role, k=0, streams=Stream.STDERR)]
    except Exception:  # noqa: BLE001 - schedulers that keep no logs, or purged them: the status message remains
        return []


def _failure(lines: List[str], status: Optional[JobStatus], handle: str) -> tuple[str, List[str]]:
    """One line saying why a job failed, and the tail of its log."""
    tail = lines[-ERROR_TAIL_LINES:]
    found = (next((line.strip() for line in reversed(tail) if pattern.search(line.strip())), None) for pattern in _ERROR_LINES)
    summary = next((line for line in found if line), status.message if status else "")
    said = status.words if status else "UNKNOWN (the scheduler does not know the job)"
    return f"job {said}: {summary or 'see ' + handle}", tail


def _cancel(runner: Any, handle: str) -> None:
    scheduler, _, app_id = parse_app_handle(handle)
    try:
        if scheduler == SLURM:  # TorchX asks for the job's state first, and fails on some
            subprocess.run(["scancel", app_id], capture_output=True, timeout=60)
        else:
            runner.cancel(handle)
    except Exception as e:  # noqa: BLE001 - one job that cannot be cancelled must not keep the others running
        print(f"could not cancel {handle}: {one_line(e)}", file=sys.stderr)


class StudyRunner:
    def __init__(self, plan: Plan, out: str | Path, settings: LaunchSettings) -> None:
        self.plan, self.settings = plan, settings
        self.dir = StudyDir(out)
        self.lock = DirectoryLock(self.dir.root, "study")
        self.status: Dict[str, Dict[str, Any]] = {}
        self.resources = parse_resources(plan.study.file.resources, settings.resources)

    def _config_path(self, cell: Cell) -> Path:
        return self.dir.cell(cell.id) / CELL_CONFIG

    def _write_config(self, cell: Cell, data_dir: Path) -> Path:
        cell_dir = self.dir.cell(cell.id)
        config = dataclasses.replace(cell.config, data_dir=str(data_dir), output_dir=str(cell_dir))
        config.train = dataclasses.replace(config.train, resume="auto")
        config.logging = dataclasses.replace(config.logging, tensorboard_dir=str(self.dir.tensorboard / cell.id))
        if not self.settings.dryrun:
            cell_dir.mkdir(parents=True, exist_ok=True)
            self._config_path(cell).write_text(to_yaml(config))
        return self._config_path(cell)

    def _app(self, component: Callable[..., AppDef], cell: Cell, config_path: Path) -> AppDef:
        return _cell_app(component, self.plan, cell, config_path, self.settings.scheduler, self.resources)

    # -- records ---------------------------------------------------------------------------
    def _record(self, cell_id: str, **fields: Any) -> None:
        self.status[cell_id] = {**self.status.get(cell_id, {}), **fields}
        self.dir.write_status(self.status)

    def _failed(self, cell: Cell, error: str, tail: List[str], progress: Progress, seconds: float = 0.0, state: str = "failed") -> None:
        (self.dir.cell(cell.id) / ERROR_FILE).write_text("\n".join([error, "", *tail]) + "\n")
        self._record(cell.id, state=state, error=error, seconds=round(seconds, 1))
        self.dir.log(f"{state} {cell.id}: {error}")
        progress.failed += 1
        progress.show(f"{state}: {cell.id}: {error}")

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Dict[str, Dict[str, Any]]:
        """Run every cell that has no results yet; return each cell's status."""
        # SIGTERM as Ctrl-C, on every scheduler: the running jobs are cancelled
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return self._run()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.lock.release()

    def _run(self) -> Dict[str, Dict[str, Any]]:
        if self.settings.max_parallel < 1:
            raise UserError(f"--max-parallel must be >= 1, got {self.settings.max_parallel}")
        component = load_component()
        check_input(self.plan)
        if not self.settings.dryrun:
            check_scheduler(self.settings.scheduler)
            self.dir.claim(plan_record(self.plan))
            self.lock.acquire()
            self.status = self.dir.read_status()
            self.dir.log(f"run {self.plan.study.name}: {len(self.plan.cells)} cells, scheduler {self.settings.scheduler}")
        data_dirs, common = prepare_cells(self.plan, self.dir, create=not self.settings.dryrun)
        with get_runner() as runner:
            cfg = _scheduler_cfg(runner, self.settings, self.dir)
            if self.settings.dryrun:
                for cell in self.plan.cells:
                    app = self._app(component, cell, self._write_config(cell, Path(data_dirs[cell.id])))
                    print(f"== cell {cell.id} ({cell.world_size} ranks)\n{runner.dryrun(app, self.settings.scheduler, cfg)}\n")
                return {}
            status = self._launch_all(runner, component, cfg, data_dirs)
        self._score_common(common)
        return status

    def _score_common(self, common: Path | str) -> None:
        """After training: every trained cell's best checkpoint on the common evaluation set."""
        if isinstance(common, str):
            print(f"common evaluation set: {common}")
            return
        for cell_id, error in score_cells(self.plan, self.dir, common).items():
            self._record(cell_id, common_error=error)
            if error:
                print(f"{cell_id}: {error}")

    def _attach(self, runner: Any, component: Callable[..., AppDef], cell: Cell) -> Optional[_Running]:
        """The cell's job from an earlier run of the study (killed before it could cancel it), if it still runs."""
        record = self.status.get(cell.id, {})
        if record.get("state") != "running" or not record.get("app"):
            return None
        status = job_status(runner, record["app"])
        if status is None or status.finished:
            return None
        self.dir.log(f"attach {cell.id}: {record['app']} ({status.words})")
        return _Running(cell, self._app(component, cell, self._config_path(cell)), record["app"])

    def _submit(self, runner: Any, component: Callable[..., AppDef], cfg: Dict[str, Any], cell: Cell, data_dir: Path, progress: Progress) -> Optional[_Running]:
        try:
            # held while the study writes the cell's config, then left to the job
            cell_lock = DirectoryLock(self.dir.cell(cell.id)).acquire()
        except UserError as e:
            self._failed(cell, str(e), [], progress)
            return None
        app = self._app(component, cell, self._write_config(cell, data_dir))
        cell_lock.release()
        try:
            handle = runner.run(app, self.settings.scheduler, _cell_cfg(cfg, self.settings.scheduler, self.dir.cell(cell.id)))
        except Exception as e:  # noqa: BLE001 - the scheduler refused the job: recorded, the others go on
            self._failed(cell, f"submission to {self.settings.scheduler} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}", [], progress)
            return None
        self.dir.log(f"launch {cell.id}: {handle}")
        return _Running(cell, app, handle)

    def _stuck(self, job: _Running, status: JobStatus) -> bool:
        """Whether the job has waited too long for something that does not come by waiting."""
        if not status.stuck:
            job.stuck_since = None
            return False
        if job.stuck_since is None:
            job.stuck_since = time.monotonic()
            self.dir.log(f"pending {job.cell.id}: {status.reason}")
        return time.monotonic() - job.stuck_since > self.settings.pending_timeout

    def _finish(self, runner: Any, job: _Running, status: Optional[JobStatus], progress: Progress) -> None:
        """Record a finished job's outcome: done, cancelled (by someone else) or failed."""
        seconds = time.monotonic() - job.started
        # the job released the cell when it ended: the study records its outcome
        cell_lock = DirectoryLock(self.dir.cell(job.cell.id)).acquire()
        succeeded = status is not None and status.state == AppState.SUCCEEDED
        if succeeded and self.dir.results(job.cell.id).is_file():
            self._record(job.cell.id, state="done", seconds=round(seconds, 1))
            self.dir.log(f"done {job.cell.id} in {seconds:.0f} s")
            progress.done += 1
            progress.seconds.append(seconds)
            progress.show(f"done: {job.cell.id} in {duration(seconds)}")
        else:
            error, tail = _failure(_log_lines(runner, job, self.dir.cell(job.cell.id)), status, job.handle)
            if succeeded:
                error = "job SUCCEEDED but wrote no results.json"
            cancelled = status is not None and status.state == AppState.CANCELLED
            self._failed(job.cell, error, tail, progress, seconds, state="cancelled" if cancelled else "failed")
        cell_lock.release()

    def _launch_all(self, runner: Any, component: Callable[..., AppDef], cfg: Dict[str, Any], data_dirs: Dict[str, Path | str]) -> Dict[str, Dict[str, Any]]:
        progress = Progress(len(self.plan.cells), self.settings.max_parallel)
        queue: List[Cell] = []
        running: List[_Running] = []
        for cell in self.plan.cells:
            if self.dir.results(cell.id).is_file():
                self.dir.log(f"skip {cell.id}: results.json exists")
                self._record(cell.id, state="done")
                progress.done += 1
            elif attached := self._attach(runner, component, cell):
                running.append(attached)
                progress.running += 1
            else:
                queue.append(cell)
        progress.show(f"{progress.done} cell(s) already done, {progress.running} still running")
        try:
            while queue or running:
                while queue and len(running) < self.settings.max_parallel:
                    cell = queue.pop(0)
                    if isinstance(data_dirs[cell.id], str):
                        self.dir.cell(cell.id).mkdir(parents=True, exist_ok=True)
                        self._failed(cell, str(data_dirs[cell.id]), [], progress)
                    elif job := self._submit(runner, component, cfg, cell, Path(data_dirs[cell.id]), progress):
                        running.append(job)
                        self._record(cell.id, state="running", app=job.handle, error=None)
                        progress.running += 1
                        progress.show(f"launched: {cell.id}")
                time.sleep(self.settings.poll_seconds)
                for job in list(running):
                    status = job_status(runner, job.handle)
                    if status is not None and not status.finished:
                        if not self._stuck(job, status):
                            continue
                        _cancel(runner, job.handle)
                        self._wait_ended(runner, [job])
                        status = JobStatus(AppState.FAILED, f"PENDING ({status.reason}) for over {self.settings.pending_timeout:.0f} s, cancelled: the cluster cannot run it as asked (see --resources, --scheduler-args)")
                    elif status is not None and status.state != AppState.SUCCEEDED:
                        _cancel(runner, job.handle)  # a state TorchX could not translate may leave it running
                    running.remove(job)
                    progress.running -= 1
                    self._finish(runner, job, status, progress)
        except (KeyboardInterrupt, SignalException) as e:
            for job in running:
                _cancel(runner, job.handle)
                self._record(job.cell.id, state="interrupted")
            self._wait_ended(runner, running)
            self.dir.log(f"interrupted ({type(e).__name__}): cancelled {', '.join(j.cell.id for j in running) or 'nothing'}")
            raise UserError(f"interrupted: {len(running)} running cell(s) cancelled; run the same command again to resume") from None
        return self.status

    def _wait_ended(self, runner: Any, jobs: List[_Running]) -> None:
        """Give cancelled jobs time to end, so that a rerun finds their cells free."""
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline and any((s := job_status(runner, job.handle)) is not None and not s.finished for job in jobs):
            time.sleep(0.5)
