"""Launch paths: the TorchX component, `.torchxconfig`, the Slurm script TorchX generates, TorchX
started outside the repository, and (slow) end-to-end runs of 2 gloo ranks through `torchx run`
and `torchrun` on tiny data. Restarts and two-node rendezvous: test_elastic.py."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.run import get_args_parser
from torchx.specs.builders import materialize_appdef

from mdaf_dist.launch import train
from mdaf_dist.config import load_config
from mdaf_dist.data.loader import num_samples
from mdaf_dist.data.prepare import prepare
from mdaf_dist.data.synth import generate
from mdaf_dist.distributed.env import init_distributed
from mdaf_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = "configs/smoke.yaml"
STEPS = 4


def _run(*command: str, timeout: float = 60, cwd: Path = REPO, env: Optional[Dict[str, str]] = None) -> str:
    """Run a console script of this environment, by default from the repository root (where
    TorchX finds `.torchxconfig`); fail with its output if it fails."""
    env = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_component_runs_torchrun_on_the_entry_module_with_config_and_overrides():
    app = materialize_appdef(
        train, ["--config", "configs/smoke.yaml", "--nnodes", "2", "--nproc_per_node", "4", "--", "loader.batch_size=64"]
    )
    (role,) = app.roles
    assert role.num_replicas == 2
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    command = role.args[1]
    assert command.startswith("torchrun ")
    assert "--nnodes 2 --nproc_per_node 4" in command
    assert command.endswith("-m mdaf_dist.train --config configs/smoke.yaml loader.batch_size=64")


def test_component_max_restarts_makes_torchrun_restart_workers_that_resume(monkeypatch):
    (role,) = materialize_appdef(train, ["--config", SMOKE, "--max_restarts", "3", "--", "loader.batch_size=64"]).roles
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert role.args[1].endswith(f"-m mdaf_dist.train --config {SMOKE} loader.batch_size=64 train.resume=auto")
    for name, value in role.env.items():
        monkeypatch.setenv(name, value)
    assert get_args_parser().parse_args(["-m", "mdaf_dist.train"]).max_restarts == 3  # what torchrun reads
    (explicit,) = materialize_appdef(train, ["--config", SMOKE, "--max_restarts", "1", "--", "train.resume=runs/a"]).roles
    assert explicit.args[1].endswith("--config configs/smoke.yaml train.resume=runs/a")
    (default,) = materialize_appdef(train, ["--config", SMOKE]).roles
    assert "PET_MAX_RESTARTS" not in default.env and "train.resume" not in default.args[1]


def test_workers_refuse_restarts_whose_store_the_first_attempt_keeps(monkeypatch):
    """What torchrun --max-restarts 3 tells its workers without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."""
    for name, value in {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True", "RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as error:
        init_distributed("cpu", timeout=datetime.timedelta(seconds=5))  # no store listens there: fail, do not wait
    assert str(error.value) == (
        "torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: "
        "without it the restarted workers cannot connect to each other (torch 2.13)"
    )


def test_torchxconfig_makes_local_cwd_the_default_scheduler():
    out = _run(str(BIN / "torchx"), "run", "--dryrun", "dist.ddp", "-j", "1x2", "-m", "mdaf_dist.train", "--", "--config", "configs/smoke.yaml")
    assert "local_cwd://torchx/" in out
    assert f"'cwd': {str(REPO)!r}" in out


def test_outside_the_repository_torchx_runs_with_the_scheduler_named_or_the_config_pointed_at(tmp_path):
    """`.torchxconfig` is read from the working directory only; elsewhere `-s local_cwd` or
    TORCHXCONFIG gives the same local run, in that directory, of the component named by its path."""
    component = str(REPO / "mdaf_dist" / "launch.py") + ":train"
    args = [component, "--config", str(REPO / SMOKE), "--nproc_per_node", "2"]
    named = _run(str(BIN / "torchx"), "run", "--dryrun", "-s", "local_cwd", *args, cwd=tmp_path)
    pointed = _run(str(BIN / "torchx"), "run", "--dryrun", *args, cwd=tmp_path, env={"TORCHXCONFIG": str(REPO / ".torchxconfig")})
    for out in (named, pointed):
        assert "local_cwd://torchx/" in out and f"'cwd': {str(tmp_path)!r}" in out
        assert "mdaf_dist.train" in out and f"'{REPO / SMOKE}'" in out  # (the printout wraps the command)
    assert "'log_dir': 'outputs/torchx/" in pointed  # .torchxconfig's, relative to this directory


def test_slurm_dryrun_writes_a_valid_sbatch_script(tmp_path):
    out = _run(
        str(BIN / "torchx"), "run", "--dryrun", "-s", "slurm", "-cfg", "partition=gpu,time=1:00:00",
        "mdaf_dist/launch.py:train", "--config", "configs/paper.yaml", "--nnodes", "2", "--nproc_per_node", "4",
        "--gpu", "4", "--", "loader.batch_size=512",
    )  # fmt: skip
    script = out.split("# SBATCH_SCRIPT\n#----------------\n", 1)[1]
    assert script.startswith("#!/bin/bash\n")
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    # one heterogeneous job group per node
    assert directives[1] == "#SBATCH hetjob" and len(directives) == 3
    for group in (directives[0], directives[2]):
        for option in ("--partition=gpu", "--time=1:00:00", "--gpus-per-task=4", "--ntasks-per-node=1"):
            assert option in group
    sruns = [line for line in script.splitlines() if "srun " in line or "--output=slurm" in line]
    assert len(sruns) == 2
    for srun in sruns:
        assert "torchrun --rdzv_backend c10d --rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in srun
        assert "--nnodes 2 --nproc_per_node 4" in srun
        assert "-m mdaf_dist.train --config configs/paper.yaml loader.batch_size=512" in srun
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    """A tiny prepared directory built with the smoke config's settings."""
    root = tmp_path_factory.mktemp("smoke")
    cfg = load_config(str(REPO / SMOKE), [f"prepare.input={root / 'raw.csv'}", f"prepare.out={root / 'data'}"])
    generate(cfg.prepare.input, 8000, seed=3, progress=False)
    prepare(cfg.prepare, cfg.model.history_length, progress=False)
    return root / "data"


def _run_overrides(data_dir: Path, output_dir: Path):
    return [f"data_dir={data_dir}", f"output_dir={output_dir}", f"train.max_steps={STEPS}", "logging.log_every=2", "logging.progress_bar=false"]


def _assert_trained_and_evaluated(output_dir: Path, data_dir: Path) -> None:
    """Rank 0 logged the training steps and one exact evaluation of every validation sample."""
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    (auc,) = events.Scalars("valid/auc")
    assert auc.step == STEPS and 0.0 < auc.value < 1.0
    (evaluated,) = events.Scalars("valid/num_samples")
    assert evaluated.value == num_samples(data_dir, "valid")
    assert events.Histograms("valid/gate")


@pytest.mark.slow
def test_torchx_dist_ddp_trains_two_gloo_ranks(smoke_data, tmp_path):
    output_dir = tmp_path / "run"
    _run(
        str(BIN / "torchx"), "run", "-cfg", f"log_dir={tmp_path / 'torchx'}", "dist.ddp", "-j", "1x2",
        "-m", "mdaf_dist.train", "--", "--config", SMOKE, *_run_overrides(smoke_data, output_dir),
        timeout=300,
    )  # fmt: skip
    _assert_trained_and_evaluated(output_dir, smoke_data)


@pytest.mark.slow
def test_torchx_component_trains_from_outside_the_repository(smoke_data, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(
        str(BIN / "torchx"), "run", "-s", "local_cwd", f"{REPO / 'mdaf_dist' / 'launch.py'}:train",
        "--config", str(REPO / SMOKE), "--nproc_per_node", "1", "--", *_run_overrides(smoke_data, Path("run")),
        cwd=elsewhere, timeout=300,
    )  # fmt: skip
    _assert_trained_and_evaluated(elsewhere / "run", smoke_data)  # a relative output_dir: in the working directory


@pytest.mark.slow
def test_torchrun_trains_two_gloo_ranks(smoke_data, tmp_path):
    output_dir = tmp_path / "run"
    _run(
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mdaf_dist.train",
        "--config", SMOKE, *_run_overrides(smoke_data, output_dir),
        timeout=300,
    )  # fmt: skip
    _assert_trained_and_evaluated(output_dir, smoke_data)
    result = json.loads((output_dir / "results.json").read_text())
    assert result["steps"] == STEPS and result["valid"]["num_samples"] == num_samples(smoke_data, "valid")
