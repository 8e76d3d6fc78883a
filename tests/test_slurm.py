"""The cluster path on a live Slurm (`tools/slurm_local.sh up`, which `.ci/run` starts): the card's
`torchx run -s slurm dist.ddp` line, and `mdaf study run --scheduler slurm` through what a cluster
does to a study: a user's `scancel` of one cell, a second run on the same directory, the study
killed and run again (it attaches to the job still running), SIGTERM, a job that can never start.
Without a cluster that answers, these tests skip with one line saying why. Two more need no
cluster: Slurm without accounting, and a bad --resources, each refused in one line.

The study's processes get a PATH without this environment's bin directory: the jobs must run the
study's interpreter, not whatever `torchrun` PATH finds. Tiny synthetic data, a few steps per cell.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from mdaf_dist import cli
from mdaf_dist.studies.workdir import StudyDir
from tests.distributed import prepare_tiny_data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a busy 2-core machine takes minutes to start a job's ranks
TIMEOUT_S = 600
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# the eager selective scan: no kernel build inside jobs the tests cancel (torch's build lock stays
# behind when a build is killed midway, and every later build waits for it)
EAGER_SCAN = "model.scan_backend=cpu"
# steps of batch 16: long enough (seconds, on a quiet machine too) for a test to suspend a cell's job while its ranks train
STEPS = 600
STUDY = f"""configs: [configs/paper.yaml, configs/studies/tiny/base_config.yaml]
synth: {{{{rows: 2000, seed: 3}}}}
name: {{name}}
overrides: [train.max_steps={STEPS}, train.max_epochs=50, train.patience=50, loader.batch_size=16, {EAGER_SCAN}]
seeds: {{seeds}}
env: {{{{OMP_NUM_THREADS: "1"}}}}
report: {{{{kind: models}}}}
"""
# one CPU per rank, so that two one-rank cells run at once on a two-CPU node
RESOURCES = "cpu_per_rank=1,memMB_per_rank=512"


def _unavailable() -> str:
    """Why there is no cluster to test against ("" when there is one)."""
    if shutil.which("sinfo") is None:
        return "Slurm's client commands are not installed: run tools/slurm_local.sh up (as root)"
    try:
        sinfo = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer within 30 s: run tools/slurm_local.sh up"
    if sinfo.returncode != 0 or not sinfo.stdout.strip():
        said = (sinfo.stderr.strip().splitlines() or ["no partition"])[-1]
        return f"sinfo does not answer ({said}): run tools/slurm_local.sh up"
    return ""


@pytest.fixture(scope="session")
def slurm() -> None:
    why = _unavailable()
    if why:
        pytest.skip(f"slurm: {why}")


def _env(path: str = "/usr/bin:/bin") -> Dict[str, str]:
    # the worktree's package for the jobs too, whatever is installed
    return {**os.environ, "PATH": path, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _study_command(study: Path, out: Path, *options: str) -> List[str]:
    return [sys.executable, "-m", "mdaf_dist.cli", "study", "run", str(study), "--out", str(out), "--scheduler", "slurm", "--resources", RESOURCES, *options]


def _wait(what: str, ready: Callable[[], bool], process: subprocess.Popen) -> None:
    """Until `ready()`; fails if `process` ends first, or after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"{what}: the process ended first (exit {process.returncode}):\n{stdout}\n{stderr}")
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S} s"
        time.sleep(0.3)


def _status(out: Path) -> Dict[str, Dict]:
    path = out / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _job_id(out: Path, cell: str) -> str:
    return _status(out).get(cell, {}).get("app", "").rpartition("/")[2]


def _squeue(job_id: str) -> str:
    """The job's state while Slurm's queue holds it, else ""."""
    queue = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"], capture_output=True, text=True)
    return queue.stdout.strip() if queue.returncode == 0 else ""


def _accounted_state(job_id: str) -> str:
    """The job's state in Slurm's accounting ("" before it is recorded): the record that stays after the queue forgets it."""
    sacct = subprocess.run(["sacct", "--noheader", "--parsable2", "-X", "--jobs", job_id, "--format", "State"], capture_output=True, text=True)
    words = sacct.stdout.split()
    return words[0] if sacct.returncode == 0 and words else ""


def _cancel_all(out: Path) -> None:
    """Whatever the study's jobs are doing, after a test: gone."""
    jobs = [record["app"].rpartition("/")[2] for record in _status(out).values() if record.get("app")]
    if jobs:
        subprocess.run(["scancel", *jobs])


def _running(out: Path, cell: str) -> bool:
    job = _job_id(out, cell)
    return bool(job) and _squeue(job) == "RUNNING"


def _write_study(root: Path, name: str, seeds: List[int]) -> Path:
    study = root / f"{name}.yaml"
    study.write_text(STUDY.format(name=name, seeds=seeds))
    return study


@pytest.mark.slurm
def test_torchx_dist_ddp_on_slurm_writes_results_from_a_job_dir_without_the_environment(slurm, tmp_path):
    data_dir = prepare_tiny_data(tmp_path / "tiny")
    job_dir, output_dir = tmp_path / "job", tmp_path / "run"
    submit = subprocess.run(
        [str(BIN / "torchx"), "run", "-s", "slurm", "-cfg", f"job_dir={job_dir}", "dist.ddp", "-j", "1x2", "--cpu", "1", "--memMB", "1024",
         "-m", "mdaf_dist.train", "--", "--config", "configs/smoke.yaml", f"data_dir={data_dir}", f"output_dir={output_dir}",
         "model.history_length=8", "train.max_steps=2", EAGER_SCAN, "logging.progress_bar=false"],
        cwd=REPO, env=_env(f"{BIN}:/usr/bin:/bin"), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().rpartition("/")[2]
    deadline = time.monotonic() + TIMEOUT_S
    try:  # accounting, not the queue: a busy controller's squeue can fail while the job still runs
        while _accounted_state(job) not in FINISHED and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job])
    assert _accounted_state(job) == "COMPLETED", (job_dir / f"slurm-{job}-train-0.err").read_text()
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
    # the job ran a copy of the code and configs, without the environment, data, outputs (.torchxignore)
    copied = {path.name for path in job_dir.iterdir()}
    assert {"mdaf_dist", "configs", "launch"} <= copied
    assert not copied & {".git", ".venv", "outputs", "data", "runs"}


@pytest.fixture(scope="module")
def cancelled_and_rerun(slurm, tmp_path_factory):
    """Two cells at once; the user `scancel`s the first and suspends the second; a second run on the
    directory is refused; the study is killed (kill -9) and run again, which attaches to the
    second cell's job (resumed then) and trains the first again."""
    root = tmp_path_factory.mktemp("cancel")
    study, out = _write_study(root, "cancel", [1, 2]), root / "out"
    first_cell, second_cell = "base_seed-1", "base_seed-2"
    command = _study_command(study, out, "--max-parallel", "2")
    first = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait("both cells running", lambda: _running(out, first_cell) and _running(out, second_cell), first)
        cancelled_job, attached_job = _job_id(out, first_cell), _job_id(out, second_cell)
        # suspended once its ranks train (a job suspended earlier may still start its step)
        log = out / "cells" / second_cell / "slurm" / f"slurm-{attached_job}-cancel-{second_cell}-0.err"
        _wait("the second cell training", lambda: log.is_file() and "world_size=1" in log.read_text(), first)
        subprocess.run(["scontrol", "suspend", attached_job], check=True)
        assert _squeue(attached_job) == "SUSPENDED"
        subprocess.run(["scancel", cancelled_job], check=True)
        _wait("the cancel recorded", lambda: _status(out)[first_cell]["state"] != "running", first)
        cancelled = dict(_status(out)[first_cell])
        second = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
        rerun = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait("the rerun to attach", lambda: f" attach {second_cell}:" in (out / "study.log").read_text(), rerun)
        subprocess.run(["scontrol", "resume", attached_job], check=True)
        stdout, stderr = rerun.communicate(timeout=TIMEOUT_S)
    finally:
        for process in (first, locals().get("rerun")):
            if process is not None and process.poll() is None:
                process.kill()
        _cancel_all(out)
    return {
        "out": out, "cancelled": cancelled, "cancelled_job": cancelled_job, "attached_job": attached_job,
        "second": second, "rerun": (rerun.returncode, stdout, stderr),
    }  # fmt: skip


@pytest.mark.slurm
def test_a_cell_cancelled_by_the_user_is_recorded_in_the_schedulers_words(cancelled_and_rerun):
    cancelled, out = cancelled_and_rerun["cancelled"], cancelled_and_rerun["out"]
    words = f"CANCELLED by {os.getuid()}"
    assert cancelled["state"] == "cancelled" and cancelled["error"].startswith(f"job {words}")
    assert (out / "cells" / "base_seed-1" / "error.txt").read_text().startswith(f"job {words}")


@pytest.mark.slurm
def test_a_second_run_on_the_directory_is_refused(cancelled_and_rerun):
    second, out = cancelled_and_rerun["second"], cancelled_and_rerun["out"]
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"mdaf study: error: {out} is in use by another study (pid ")


@pytest.mark.slurm
def test_a_rerun_attaches_to_the_live_job_and_completes_the_study(cancelled_and_rerun):
    returncode, stdout, stderr = cancelled_and_rerun["rerun"]
    out = cancelled_and_rerun["out"]
    assert returncode == 0, f"{stdout}\n{stderr}"
    assert "all 2 cells done" in stdout
    log = (out / "study.log").read_text()
    # the suspended cell's job was followed to its end, not submitted again; the cancelled one was
    assert log.count(" launch base_seed-2:") == 1 and log.count(" launch base_seed-1:") == 2
    assert f" attach base_seed-2: slurm://torchx/{cancelled_and_rerun['attached_job']}" in log
    status = _status(out)
    assert status["base_seed-1"]["state"] == status["base_seed-2"]["state"] == "done"
    assert status["base_seed-2"]["app"].endswith(f"/{cancelled_and_rerun['attached_job']}")
    for cell in ("base_seed-1", "base_seed-2"):
        assert json.loads(StudyDir(out).results(cell).read_text())["steps"] == STEPS
        # the scheduler's logs are in the cell's directory, named after the study and the cell
        job = status[cell]["app"].rpartition("/")[2]
        assert (out / "cells" / cell / "slurm" / f"slurm-{job}-cancel-{cell}-0.err").is_file()


@pytest.mark.slurm
def test_sigterm_cancels_the_running_jobs(slurm, tmp_path):
    study, out = _write_study(tmp_path, "term", [1]), tmp_path / "out"
    study_run = subprocess.Popen(_study_command(study, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait("the cell running", lambda: _running(out, "base_seed-1"), study_run)
        study_run.send_signal(signal.SIGTERM)
        _, stderr = study_run.communicate(timeout=120)
        left = _squeue(_job_id(out, "base_seed-1"))  # gone from the queue when the study exits
    finally:
        study_run.kill()
        _cancel_all(out)
    assert study_run.returncode == 2 and stderr.strip().endswith("interrupted: 1 running cell(s) cancelled; run the same command again to resume")
    assert not left
    assert _status(out)["base_seed-1"]["state"] == "interrupted"


@pytest.mark.slurm
def test_a_job_the_partition_can_never_run_fails_with_the_reason(slurm, tmp_path):
    study, out = _write_study(tmp_path, "toobig", [1]), tmp_path / "out"
    # more CPUs than the node has: Slurm takes the job and keeps it pending (PartitionConfig)
    command = [*_study_command(study, out, "--pending-timeout", "2"), "--resources", f"cpu_per_rank={4 * os.cpu_count()}"]
    run = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 1 and "1 cell(s) failed" in run.stdout
    error = _status(out)["base_seed-1"]["error"]
    assert error.startswith("job PENDING (PartitionConfig) for over 2 s, cancelled: the cluster cannot run it as asked"), error
    assert not _squeue(_job_id(out, "base_seed-1"))


def _study_cli(study: Path, out: Path, *options: str) -> List[str]:
    """The study command's arguments, for `cli.main` in this process (in the repository)."""
    return _study_command(study, out, *options)[3:]


@pytest.fixture
def in_repo(monkeypatch) -> None:
    monkeypatch.chdir(REPO)


def test_slurm_without_accounting_is_refused_before_anything_is_submitted(tmp_path, monkeypatch, capsys, in_repo):
    # Slurm's own commands where accounting is off: sacct refuses, sbatch would take the job
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (fake / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path / 'submitted'}\necho 1\n")
    for command in fake.iterdir():
        command.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    study, out = _write_study(tmp_path, "noacct", [1]), tmp_path / "out"
    assert cli.main(_study_cli(study, out)) == 2
    assert capsys.readouterr().err.strip() == (
        "mdaf study: error: --scheduler slurm needs Slurm accounting (slurmdbd), but `sacct` says: sacct: error: Slurm accounting storage is disabled"
    )
    assert not (tmp_path / "submitted").exists() and not (out / "status.json").exists()


@pytest.mark.parametrize(
    "resources, error",
    [
        ("cpus=4", "Key 'cpus' not in 'ResourcesSpec' (keys: cpu_per_rank, gpu_per_rank, memMB_per_rank)"),
        ("memMB_per_rank=lots", "Value 'lots' of type 'str' could not be converted to Integer (keys: cpu_per_rank, gpu_per_rank, memMB_per_rank)"),
        ("gpu_per_rank=-1", "gpu_per_rank=-1 must not be negative"),
    ],
)
def test_bad_resources_are_refused_in_one_line(tmp_path, capsys, in_repo, resources, error):
    study = _write_study(tmp_path, "bad", [1])
    assert cli.main([*_study_cli(study, tmp_path / "out", "--dryrun"), "--resources", resources]) == 2
    assert capsys.readouterr().err.strip() == f"mdaf study: error: --resources {resources!r}: {error}"


def test_resources_from_the_command_line_reach_the_sbatch_script(tmp_path, capsys, in_repo):
    study = _write_study(tmp_path, "asks", [1])
    assert cli.main([*_study_cli(study, tmp_path / "out", "--dryrun", "world_size=2"), "--resources", "cpu_per_rank=3,memMB_per_rank=1000"]) == 0
    stdout = capsys.readouterr().out
    (directive,) = [line for line in stdout.splitlines() if line.startswith("#SBATCH")]
    assert directive == "#SBATCH --job-name=asks-base_seed-1-0 --requeue --ntasks-per-node=1 --cpus-per-task=6 --mem=2000"
    # this environment's torchrun, whatever PATH holds
    assert f"bash -c '{sys.executable} -m torch.distributed.run --rdzv_backend" in stdout
