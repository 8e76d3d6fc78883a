"""TorchX components for mdaf_dist.

`train` is `dist.ddp` with the entry point, the config file and the world shape spelled the
way this project thinks about them, so one command line serves every TorchX scheduler:

    torchx run launch/components.py:train --config configs/smoke.yaml --nproc_per_node 2
    torchx run -s slurm launch/components.py:train --config configs/paper.yaml \\
        --nnodes 2 --nproc_per_node 8 --gpu 8 -- train.max_steps=20000

Everything after the options (after `--`, if an override could be read as an option) is passed
to `python -m mdaf_dist.train` as dotted config overrides.
"""

# no `from __future__ import annotations`: TorchX reads the parameter types at run time
from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp

ENTRY_MODULE = "mdaf_dist.train"


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
        rdzv_port: port of the c10d rendezvous store on the first node (multi-node only)
        mounts: volumes for the workers, e.g. type=bind,src=/data,dst=/data
    """
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
