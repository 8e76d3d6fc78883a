"""An example component of your own, built on the project's: `train` ships in the package
(mdaf_dist/launch.py; `torchx run mdaf_dist/launch.py:train --help` lists its options) and a
component file like this one fixes what your jobs share, here the smoke config on local CPUs:

    torchx run launch/components.py:smoke --nproc_per_node 2 -- train.max_steps=10
"""

# no `from __future__ import annotations`: TorchX reads the parameter types at run time
import torchx.specs as specs

from mdaf_dist.launch import train


def smoke(*overrides: str, nproc_per_node: int = 2) -> specs.AppDef:
    """configs/smoke.yaml on nproc_per_node CPU workers of this machine.

    Args:
        overrides: dotted config overrides, e.g. train.max_steps=10
        nproc_per_node: worker processes
    """
    return train("configs/smoke.yaml", *overrides, nproc_per_node=nproc_per_node)
