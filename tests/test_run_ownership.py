"""One run, one directory: a second run (or study) on a directory in use is refused in one line
naming the holder, and a study does not write into a cell a run is using; a process started through `mdaf_dist.distributed.lifetime` dies with its
launcher; `kill -9` of the torchrun agent, or of `mdaf study run`, leaves no process running
(slow: checked in /proc by an environment variable only the run's processes carry)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from mdaf_dist import cli
from mdaf_dist.config import to_yaml
from mdaf_dist.files import DirectoryLock
from mdaf_dist.studies.grid import expand, plan_record
from mdaf_dist.studies.spec import load_study
from mdaf_dist.studies.workdir import StudyDir
from mdaf_dist import cli
from tests.distributed import tiny_config


def main(argv):
    """`mdaf train ARGV` (python -m mdaf_dist.train runs the same)."""
    return cli.main(["train", *argv])


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
TIMEOUT_S = 240
# the time the kernel and the launchers' children get to go after a kill -9
GONE_WITHIN_S = 20
# a run that would outlast that wait by far, were its processes left running
LONG_RUN = ("train.max_epochs=1000", "train.patience=0", "checkpoint.every_steps=2")
TINY_STUDY = """configs: [configs/paper.yaml, configs/studies/tiny/base_config.yaml]
synth: {rows: 4000, categories: 40, seed: 3}
name: lifetime
overrides: [train.max_epochs=1000, train.patience=0, checkpoint.every_steps=2]
axes:
  - {name: Fusion, key: model.fusion, values: [gate]}
seeds: [1]
"""
CELL = "fusion-gate_seed-1"


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def test_a_run_on_a_directory_in_use_is_refused_naming_the_holder(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", str(SMOKE_CONFIG), f"data_dir={tiny_data_dir}", f"output_dir={out}", "model.history_length=8", "train.max_steps=1"]
    with DirectoryLock(out):
        assert main(args) == 2
    assert capsys.readouterr().err == f"mdaf train: error: {out} is in use by another run ({_holder()}); wait for it or stop it first\n"
    assert not (out / "checkpoints").exists()


def test_a_study_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    study, out = tmp_path / "lifetime.yaml", tmp_path / "study"
    study.write_text(TINY_STUDY)
    # what a running study holds: the directory, claimed, and its lock
    StudyDir(out).claim(plan_record(expand(load_study(str(study)))))
    with DirectoryLock(out, "study"):
        assert cli.main(["study", "run", str(study), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"mdaf study: error: {out} is in use by another study ({_holder()}); wait for it or stop it first\n"
    assert not (out / "data").exists()


def test_a_study_cell_in_use_by_a_run_fails_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    study, out = tmp_path / "lifetime.yaml", tmp_path / "study"
    study.write_text(TINY_STUDY)
    StudyDir(out).claim(plan_record(expand(load_study(str(study)))))  # a study run there before
    cell = StudyDir(out).cell(CELL)
    with DirectoryLock(cell):  # a run started there by hand
        study_run = subprocess.run([str(BIN / "mdaf"), "study", "run", str(study), "--out", str(out)], cwd=REPO, env=_marked_env(""), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert study_run.returncode == 1 and f"1 cell(s) failed (errors in {out}/status.json): {CELL}" in study_run.stdout
    status = json.loads((out / "status.json").read_text())[CELL]
    assert (status["state"], status["error"]) == ("failed", f"{cell} is in use by another run ({_holder()}); wait for it or stop it first")
    assert sorted(p.name for p in cell.iterdir()) == [".lock", "error.txt"]


def _marked_env(marker: str) -> Dict[str, str]:
    """This environment, the worktree's package first, and a variable only this test's processes carry."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "MDAF_TEST_MARKER": marker}


def _marked(marker: str) -> List[int]:
    """Living processes whose environment carries `marker` (a zombie's environment reads empty)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"MDAF_TEST_MARKER={marker}".encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return pids


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.1)


def _assert_all_gone_after_kill(process: subprocess.Popen, marker: str) -> None:
    """kill -9 `process`; every process carrying `marker` must be gone soon after (any left is
    killed, so the test leaves nothing behind either way)."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"still running after kill -9 of {process.args[:3]}: {left}"


def test_a_process_started_through_lifetime_dies_with_its_launcher():
    marker = uuid.uuid4().hex
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-m', 'mdaf_dist.distributed.lifetime', str(os.getpid()), 'sleep', '600'], start_new_session=True); "
         "time.sleep(600)"],
        env=_marked_env(marker),
    )  # fmt: skip
    _wait_for(lambda: len(_marked(marker)) == 2, launcher, "the sleeping child")
    _assert_all_gone_after_kill(launcher, marker)

    gone = subprocess.run([sys.executable, "-m", "mdaf_dist.distributed.lifetime", "1", "true"], env=_marked_env(marker), capture_output=True, text=True)
    assert (gone.returncode, gone.stderr) == (1, "mdaf: the launcher (pid 1) is gone: true not started\n")


@pytest.mark.slow
def test_kill_9_of_the_torchrun_agent_leaves_no_worker(tiny_data_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(tiny_config(tiny_data_dir, tmp_path / "run", *LONG_RUN)))
    marker = uuid.uuid4().hex
    agent = subprocess.Popen(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "mdaf_dist.train", "--config", str(config)],
        env=_marked_env(marker), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: any((tmp_path / "run" / "checkpoints").glob("step_*")), agent, "checkpoint")
    assert len(_marked(marker)) == 3  # the agent and its two workers, training
    _assert_all_gone_after_kill(agent, marker)


@pytest.mark.slow
def test_kill_9_of_mdaf_study_run_leaves_no_process(tmp_path):
    study, out = tmp_path / "lifetime.yaml", tmp_path / "study"
    study.write_text(TINY_STUDY)
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [str(BIN / "mdaf"), "study", "run", str(study), "--out", str(out)],
        cwd=REPO, env=_marked_env(marker), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: any((out / "cells").glob("*/checkpoints/step_*")), process, "checkpoint of the cell")
    assert len(_marked(marker)) == 3  # the study, the cell's torchrun and its worker, training
    _assert_all_gone_after_kill(process, marker)
