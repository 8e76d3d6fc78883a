"""torchrun's elastic agent around `python -m mdaf_dist.train` (slow: several processes each).

- Restart: a worker killed with SIGKILL in the middle of an epoch makes the agent restart every
  worker (`--max-restarts 1`); with `train.resume=auto` they resume from the latest complete
  checkpoint and end with the per-step losses and the final validation metrics of a run that
  was never interrupted.
- Two nodes on one machine: two agents (`--nnodes 2 --nproc-per-node 1`) meet at a c10d
  rendezvous on localhost, so the local world size (1) differs from the world size (2); they
  plan, shard, train and checkpoint together like one node of two ranks.

Both compare with the same uninterrupted single-node 2-rank run, dropout on: a resume restores
the data position and every random stream, and ranks draw theirs the same wherever they run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from mdaf_dist.config import to_yaml
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.train.trainer import RESULTS_FILE
from tests.distributed import tiny_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHECKPOINT_EVERY = 5
TIMEOUT_S = 240
STEP_LOSS = re.compile(r" step=(\d+)/\d+ loss=(\S+) ")
RESUMED = re.compile(r"^resumed from \S+ at step (\d+) ", re.M)
# as the README's restart command: restarted workers must not share the agent's store (see there)
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def config_file(tiny_data_dir, tmp_path_factory) -> Path:
    """One epoch of the tiny model with the paper's dropout, a checkpoint every few steps, every
    step's loss logged."""
    cfg = tiny_config(
        tiny_data_dir, Path("unused"), "train.max_epochs=1", "model.dropout=0.15",
        f"checkpoint.every_steps={CHECKPOINT_EVERY}", "logging.log_every=1",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("elastic") / "config.yaml"
    path.write_text(to_yaml(cfg))
    return path


def _torchrun(
    launch: List[str], config_file: Path, output_dir: Path, *overrides: str, env: Optional[Dict[str, str]] = None
) -> subprocess.Popen:
    """Start one torchrun agent in a process group of its own (with its workers); its output
    (rank 0 logs to stderr) goes to files in output_dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(BIN / "torchrun"), *launch, "-m", "mdaf_dist.train",
        "--config", str(config_file), f"output_dir={output_dir}", *overrides,
    ]  # fmt: skip
    name = f"agent{len(list(output_dir.glob('agent*.out')))}"
    with open(output_dir / f"{name}.out", "w") as out, open(output_dir / f"{name}.err", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, **(env or {})}, start_new_session=True)


def _finish(agent: subprocess.Popen) -> None:
    """Wait for the agent; one that does not end in time is killed with its workers."""
    try:
        agent.wait(timeout=TIMEOUT_S)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert agent.returncode == 0, f"{agent.args} failed with {agent.returncode}"


def _output(output_dir: Path) -> str:
    return "".join(path.read_text() for pattern in ("agent*.out", "agent*.err") for path in sorted(output_dir.glob(pattern)))


def _step_losses(output_dir: Path) -> Dict[int, float]:
    """Rank 0's logged loss (6 significant digits) of every step; a step run twice (before and
    after a restart) keeps its last value."""
    return {int(step): float(loss) for step, loss in STEP_LOSS.findall(_output(output_dir))}


def _results(output_dir: Path) -> dict:
    return json.loads((output_dir / RESULTS_FILE).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of the agent's worker process with global rank `rank`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if parent == agent_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under agent {agent_pid}")


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    _finish(_torchrun(["--standalone", "--nproc-per-node", "2"], config_file, output_dir))
    return output_dir


def _assert_same_training(run: Path, reference: Path) -> None:
    """Same loss at every step, same evaluations, same final validation metrics."""
    losses, expected_losses = _step_losses(run), _step_losses(reference)
    assert len(expected_losses) == _results(reference)["steps"] > 2 * CHECKPOINT_EVERY
    assert losses == pytest.approx(expected_losses, rel=0, abs=2e-6)  # one unit of the last printed digit
    results, expected = _results(run), _results(reference)
    evaluations, expected_evaluations = results["evaluations"], expected["evaluations"]
    assert [(e["epoch"], e["step"]) for e in evaluations] == [(e["epoch"], e["step"]) for e in expected_evaluations]
    for key in ("auc", "logloss"):
        assert [e[key] for e in evaluations] == pytest.approx([e[key] for e in expected_evaluations], rel=0, abs=1e-6)
        assert results["valid"][key] == pytest.approx(expected["valid"][key], rel=0, abs=1e-6)
    assert results["valid"]["num_samples"] == expected["valid"]["num_samples"]


def test_a_killed_worker_is_restarted_and_resumes_to_the_uninterrupted_result(config_file, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    agent = _torchrun(
        ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"], config_file, output_dir, "train.resume=auto",
        env=RESTARTABLE,
    )
    try:
        first_checkpoint = output_dir / "checkpoints" / f"{ckpt.PREFIX}{CHECKPOINT_EVERY:08d}" / ckpt.TRAINER_FILE
        deadline = time.monotonic() + TIMEOUT_S
        while not first_checkpoint.is_file():
            assert agent.poll() is None, f"the run ended before its first checkpoint:\n{_output(output_dir)}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        os.kill(_worker_pid(agent.pid, rank=1), signal.SIGKILL)
    finally:
        _finish(agent)
    output = _output(output_dir)
    (resumed_at,) = (int(step) for step in RESUMED.findall(output))
    epoch_ends = [evaluation["step"] for evaluation in _results(uninterrupted)["evaluations"]]
    assert CHECKPOINT_EVERY <= resumed_at < epoch_ends[-1] and resumed_at not in epoch_ends, "resumed mid-epoch"
    _assert_same_training(output_dir, uninterrupted)
    print(f"killed rank 1, resumed at step {resumed_at}: final AUC {_results(output_dir)['valid']['auc']:.6f}, "
          f"uninterrupted {_results(uninterrupted)['valid']['auc']:.6f}")


def test_two_agents_of_one_rank_each_train_like_one_node_of_two(config_file, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    launch = [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", f"two-nodes-{os.getpid()}",
    ]  # fmt: skip
    # torchrun leaves OMP_NUM_THREADS alone for one worker per node; two such "nodes" on one
    # machine would oversubscribe its cores
    agents = [_torchrun(launch, config_file, output_dir, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    for agent in agents:
        _finish(agent)
    _assert_same_training(output_dir, uninterrupted)
    latest = ckpt.checkpoints(output_dir / "checkpoints")[-1]
    assert ckpt.read_trainer_state(latest)["world_size"] == 2
    assert sorted(p.name for p in latest.glob("rank_*.pt")) == [ckpt.rank_file(0), ckpt.rank_file(1)]
    plan = json.loads((output_dir / "sharding_plan.json").read_text())
    reference_plan = json.loads((uninterrupted / "sharding_plan.json").read_text())
    assert plan == reference_plan
