"""TorchX components for mdaf_dist, shipped with the package (`mdaf study run` launches this
file's `train`; launch/components.py in a source checkout is an example that builds on it).

`train` is `dist.ddp` with the entry point, the config file and the world shape spelled the
way this project thinks about them, so one command line serves every TorchX scheduler:

    torchx run mdaf_dist/launch.py:train --config configs/smoke.yaml --nproc_per_node 2
    torchx run -s slurm mdaf_dist/launch.py:train --config configs/paper.yaml \\
        --nnodes 2 --nproc_per_node 8 --gpu 8 -- train.max_steps=20000

Everything after the options (after `--`, if an override could be read as an option) is passed
to `python -m mdaf_dist.train` as dotted config overrides.

The component file can be named by its path from any directory (`torchx run
/path/to/mdaf_dist/launch.py:train ...`): the workers run the installed `mdaf_dist`. What does
depend on the directory `torchx run` starts in: `.torchxconfig` is read from there (elsewhere,
name the scheduler, e.g. `-s local_cwd`, or point `TORCHXCONFIG` at the repository's file), and
relative paths (the config file, data_dir, output_dir) are resolved against the job's working
directory, which is that directory for local_cwd and Slurm.
"""

# no `from __future__ import annotations`: TorchX reads the parameter types at run time
from typing import Dict, List, Optional, Sequence

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp

ENTRY_MODULE = "mdaf_dist.train"
# torchrun reads every option from a PET_<OPTION> variable too; dist.ddp has no --max-restarts
MAX_RESTARTS_ENV = "PET_MAX_RESTARTS"
# torch 2.13's agent shares its rendezvous store with the workers' process group and keeps it
# across restarts: restarted workers find their predecessors' addresses there and fail to
# connect (gloo: "connectFullMesh failed ... Connection refused"); a store of their own avoids it
UNSHARED_STORE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
RESUME_LATEST = "train.resume=auto"


def train(
    config: str,
    *overrides: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = torchx.IMAGE,
    name: str = "mdaf/",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distributed MDAF training: `torchrun -m mdaf_dist.train --config CONFIG OVERRIDES...`
    on nnodes x nproc_per_node workers (CPU + gloo, or one GPU per worker + NCCL).

    Args:
        config: YAML config file, relative to the job's working directory
        overrides: dotted config overrides, e.g. train.max_steps=100 model.embedding_dim=32
        nnodes: number of nodes (hosts)
        nproc_per_node: worker processes per node; on GPU hosts at most the number of GPUs
        image: container image with mdaf_dist installed (Kubernetes, Docker); ignored by local_cwd and Slurm, which run in the current directory
        name: job name as {experimentname}/{runname}; the run name defaults to the module name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB
        h: a registered named resource, used instead of cpu, gpu and memMB
        env: extra environment variables, e.g. LOGLEVEL=INFO,NCCL_DEBUG=WARN
        max_retries: how many times the scheduler may restart the job after a failure
        max_restarts: how many times torchrun restarts all workers after one fails (torchrun --max-restarts); the restarted workers resume from the latest checkpoint (train.resume=auto unless an override sets train.resume)
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        mounts: volumes for the workers, e.g. type=bind,src=/data,dst=/data
    """
    if max_restarts > 0:
        env = {**(env or {}), MAX_RESTARTS_ENV: str(max_restarts), **UNSHARED_STORE_ENV}
        overrides = _with_resume(overrides)
    return ddp(
        "--config",
        config,
        *overrides,
        m=ENTRY_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )


def _with_resume(overrides: Sequence[str]) -> List[str]:
    """The overrides, with train.resume=auto added unless they set train.resume already."""
    if any(override.startswith("train.resume=") for override in overrides):
        return list(overrides)
    return [*overrides, RESUME_LATEST]
