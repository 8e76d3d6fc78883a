"""`mdaf study run`: prepare the study's data, then train every cell as a TorchX job.

Each cell is the project's own component (`mdaf_dist/launch.py:train`, loaded by TorchX's
component finder as `torchx run` loads it) submitted through TorchX's Python API
(`get_runner().run`), on `local_cwd` by default or any TorchX scheduler by name, so a study that
outgrows one machine runs on a cluster unchanged: DIR must then be on storage the cluster sees
(prepare runs here, in the study's process, before the jobs are submitted).

After training, every trained cell's best checkpoint is scored on the study's common evaluation
set (studies.common), here in the study's process.

Resumable: a cell with a results.json is skipped (and a scored one is not scored again); any other cell (new, failed, interrupted) is
launched with `train.resume=auto`, so an interrupted one continues from its last checkpoint.
A failing cell is recorded (status.json, cells/<id>/error.txt) and the others go on. SIGINT and
SIGTERM cancel the running jobs and leave everything for the next run.

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from torchx.runner import get_runner
from torchx.runner.config import apply as apply_torchxconfig
from torchx.schedulers.local_scheduler import SignalException
from torchx.specs import AppDef, AppState, AppStatus
from torchx.schedulers.api import Stream
from torchx.specs.finder import get_component

import mdaf_dist
from mdaf_dist.config import to_yaml
from mdaf_dist.errors import UserError
from mdaf_dist.files import DirectoryLock
from mdaf_dist.studies.common import score_cells
from mdaf_dist.studies.datacache import check_input, prepare_cells
from mdaf_dist.studies.grid import Cell, Plan, plan_record
from mdaf_dist.studies.progress import Progress, duration
from mdaf_dist.studies.workdir import CELL_CONFIG, ERROR_FILE, StudyDir

COMPONENT_FILE = Path(mdaf_dist.__file__).resolve().with_name("launch.py")
LOCAL_SCHEDULERS = ("local_cwd", "local_docker")
ERROR_TAIL_LINES = 40


@dataclass
class LaunchSettings:
    scheduler: str = "local_cwd"
    # TorchX scheduler options as `torchx run -cfg` takes them, e.g. "partition=gpu,time=1:00:00"
    scheduler_args: str = ""
    max_parallel: int = 1
    dryrun: bool = False
    poll_seconds: float = 1.0


@dataclass
class _Running:
    cell: Cell
    app: AppDef
    handle: str
    started: float = field(default_factory=time.monotonic)


def load_component() -> Callable[..., AppDef]:
    return get_component(f"{COMPONENT_FILE}:train").fn


def _cell_app(component: Callable[..., AppDef], plan: Plan, cell: Cell, config_path: Path, scheduler: str) -> AppDef:
    per_rank, ranks = plan.study.file.resources, cell.nproc_per_node
    env = dict(plan.study.file.env)
    if scheduler == "local_cwd":
        # local_cwd starts `torchrun` from PATH: this environment's first
        env["PATH"] = str(Path(sys.executable).parent)
    app = component(
        str(config_path), nnodes=cell.nnodes, nproc_per_node=ranks, name=f"mdaf/{cell.id}",
        cpu=per_rank.cpu_per_rank * ranks, gpu=per_rank.gpu_per_rank * ranks, memMB=per_rank.memMB_per_rank * ranks, env=env or None,
    )  # fmt: skip
    if scheduler == "local_cwd":
        # local_cwd starts the job from this process, in a session of its own: it must die with it
        role = app.roles[0]
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


# what a failed job's log says, most telling first: this project's one-line errors
# ("mdaf train: error: ..."), then a Python exception other than torchrun's wrapper of it
_ERROR_LINES = (
    re.compile(r"(^|[\s:\]])error: \S", re.IGNORECASE),
    re.compile(r"^(\[\d+\]:)?(?!.*ChildFailedError)[\w.]*(Error|Exception): \S"),
)


def _failure(runner: Any, running: _Running, status: Optional[AppStatus]) -> tuple[str, List[str]]:
    """One line saying why a job failed, and the tail of its log."""
    lines: List[str] = []
    try:
        lines = [line.rstrip("\n") for line in runner.log_lines(running.handle, running.app.roles[0].name, k=0, streams=Stream.STDERR)]
    except Exception:  # noqa: BLE001 - schedulers that keep no logs, or purged them: the status message remains
        pass
    tail = lines[-ERROR_TAIL_LINES:]
    found = (next((line.strip() for line in reversed(tail) if pattern.search(line.strip())), None) for pattern in _ERROR_LINES)
    summary = next((line for line in found if line), status.msg.strip() if status and status.msg else "")
    state = status.state.name if status else "UNKNOWN"
    return f"job {state}: {summary or 'see ' + running.handle}", tail


class StudyRunner:
    def __init__(self, plan: Plan, out: str | Path, settings: LaunchSettings) -> None:
        self.plan, self.settings = plan, settings
        self.dir = StudyDir(out)
        self.lock = DirectoryLock(self.dir.root, "study")
        self.status: Dict[str, Dict[str, Any]] = {}

    def _write_config(self, cell: Cell, data_dir: Path) -> Path:
        cell_dir = self.dir.cell(cell.id)
        config = dataclasses.replace(cell.config, data_dir=str(data_dir), output_dir=str(cell_dir))
        config.train = dataclasses.replace(config.train, resume="auto")
        config.logging = dataclasses.replace(config.logging, tensorboard_dir=str(self.dir.tensorboard / cell.id))
        if self.settings.dryrun:
            return cell_dir / CELL_CONFIG
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / CELL_CONFIG).write_text(to_yaml(config))
        return cell_dir / CELL_CONFIG

    # -- records ---------------------------------------------------------------------------
    def _record(self, cell_id: str, **fields: Any) -> None:
        self.status[cell_id] = {**self.status.get(cell_id, {}), **fields}
        self.dir.write_status(self.status)

    def _failed(self, cell: Cell, error: str, tail: List[str], progress: Progress, seconds: float = 0.0) -> None:
        (self.dir.cell(cell.id) / ERROR_FILE).write_text("\n".join([error, "", *tail]) + "\n")
        self._record(cell.id, state="failed", error=error, seconds=round(seconds, 1))
        self.dir.log(f"failed {cell.id}: {error}")
        progress.failed += 1
        progress.show(f"failed: {cell.id}: {error}")

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Dict[str, Dict[str, Any]]:
        """Run every cell that has no results yet; return each cell's status."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> Dict[str, Dict[str, Any]]:
        if self.settings.max_parallel < 1:
            raise UserError(f"--max-parallel must be >= 1, got {self.settings.max_parallel}")
        component = load_component()
        check_input(self.plan)
        if not self.settings.dryrun:
            self.dir.claim(plan_record(self.plan))
            self.lock.acquire()
            self.status = self.dir.read_status()
            self.dir.log(f"run {self.plan.study.name}: {len(self.plan.cells)} cells, scheduler {self.settings.scheduler}")
        data_dirs, common = prepare_cells(self.plan, self.dir, create=not self.settings.dryrun)
        with get_runner() as runner:
            cfg = _scheduler_cfg(runner, self.settings, self.dir)
            if self.settings.dryrun:
                for cell in self.plan.cells:
                    app = _cell_app(component, self.plan, cell, self._write_config(cell, Path(data_dirs[cell.id])), self.settings.scheduler)
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

    def _launch_all(self, runner: Any, component: Callable[..., AppDef], cfg: Dict[str, Any], data_dirs: Dict[str, Path | str]) -> Dict[str, Dict[str, Any]]:
        progress = Progress(len(self.plan.cells), self.settings.max_parallel)
        queue: List[Cell] = []
        for cell in self.plan.cells:
            if self.dir.results(cell.id).is_file():
                self.dir.log(f"skip {cell.id}: results.json exists")
                self._record(cell.id, state="done")
                progress.done += 1
            else:
                queue.append(cell)
        progress.show(f"{progress.done} cell(s) already done")
        running: List[_Running] = []
        try:
            while queue or running:
                while queue and len(running) < self.settings.max_parallel:
                    cell = queue.pop(0)
                    if isinstance(data_dirs[cell.id], str):
                        self.dir.cell(cell.id).mkdir(parents=True, exist_ok=True)
                        self._failed(cell, str(data_dirs[cell.id]), [], progress)
                        continue
                    try:
                        # held while the study writes the cell's config, then left to the job
                        cell_lock = DirectoryLock(self.dir.cell(cell.id)).acquire()
                    except UserError as e:
                        self._failed(cell, str(e), [], progress)
                        continue
                    app = _cell_app(component, self.plan, cell, self._write_config(cell, Path(data_dirs[cell.id])), self.settings.scheduler)
                    cell_lock.release()
                    try:
                        handle = runner.run(app, self.settings.scheduler, cfg)
                    except Exception as e:  # noqa: BLE001 - the scheduler refused the job: recorded, the others go on
                        self._failed(cell, f"submission to {self.settings.scheduler} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}", [], progress)
                        continue
                    running.append(_Running(cell, app, handle))
                    self._record(cell.id, state="running", app=handle, error=None)
                    self.dir.log(f"launch {cell.id}: {handle}")
                    progress.running += 1
                    progress.show(f"launched: {cell.id}")
                time.sleep(self.settings.poll_seconds)
                for job in list(running):
                    status = runner.status(job.handle)
                    if status is not None and not status.is_terminal():
                        continue
                    running.remove(job)
                    progress.running -= 1
                    seconds = time.monotonic() - job.started
                    # the job released the cell when it ended: the study records its outcome
                    cell_lock = DirectoryLock(self.dir.cell(job.cell.id)).acquire()
                    if status is not None and status.state == AppState.SUCCEEDED and self.dir.results(job.cell.id).is_file():
                        self._record(job.cell.id, state="done", seconds=round(seconds, 1))
                        self.dir.log(f"done {job.cell.id} in {seconds:.0f} s")
                        progress.done += 1
                        progress.seconds.append(seconds)
                        progress.show(f"done: {job.cell.id} in {duration(seconds)}")
                    else:
                        error, tail = _failure(runner, job, status)
                        if status is not None and status.state == AppState.SUCCEEDED:
                            error = "job SUCCEEDED but wrote no results.json"
                        self._failed(job.cell, error, tail, progress, seconds)
                    cell_lock.release()
        except (KeyboardInterrupt, SignalException) as e:
            for job in running:
                runner.cancel(job.handle)
                self._record(job.cell.id, state="interrupted")
            self.dir.log(f"interrupted ({e}): cancelled {', '.join(j.cell.id for j in running) or 'nothing'}")
            raise UserError(f"interrupted: {len(running)} running cell(s) cancelled; run the same command again to resume") from None
        return self.status
