"""The pinned torch / fbgemm-gpu / torchrec stack, as the project takes it: its versions checked
and its known harmless warnings muted, before the project imports any of them.

The three must match exactly (fbgemm-gpu's kernels are built against one torch, torchrec against
one fbgemm-gpu); a mismatch fails deep inside an import or, worse, at the first sharded lookup.
The check reads the installed distributions' versions (importlib.metadata), so it costs no import
of torch, and names in one line what to install.

The warnings muted are each matched by their message (and logger), so that any other warning,
and every warning of the project's own, still shows.
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata
from typing import Dict, Optional

from mdaf_dist.errors import UserError

TORCH, FBGEMM, TORCHREC = "2.13.0", "1.8.0", "1.8.0"
# the CUDA build of fbgemm-gpu, or its CPU build
FBGEMM_DISTRIBUTIONS = ("fbgemm-gpu", "fbgemm-gpu-cpu")


def _installed(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed() -> Dict[str, Optional[str]]:
    """Version of each pinned package here (a local tag such as +cpu dropped), None if missing."""
    fbgemm = next(filter(None, map(_installed, FBGEMM_DISTRIBUTIONS)), None)
    found = {"torch": _installed("torch"), "fbgemm-gpu": fbgemm, "torchrec": _installed("torchrec")}
    return {name: None if version is None else version.split("+")[0] for name, version in found.items()}


def check_versions() -> None:
    pinned = {"torch": TORCH, "fbgemm-gpu": FBGEMM, "torchrec": TORCHREC}
    wrong = {name: version for name, version in installed().items() if version != pinned[name]}
    if wrong:
        found = ", ".join(f"{name} {version or 'missing'}" for name, version in wrong.items())
        raise UserError(
            f"mdaf_dist needs torch=={TORCH}, fbgemm-gpu=={FBGEMM} (fbgemm-gpu-cpu=={FBGEMM} on CPU) and torchrec=={TORCHREC}, "
            f"found {found}: run `make install`, or pip install those pins (torchrec with --no-deps)"
        )


# torch 2.13's ShardedTensor, which torchrec 1.8's sharded tables and their checkpoints still use
SHARDED_TENSOR_DEPRECATION = "Please use DTensor instead and we are deprecating ShardedTensor"
# logged once per process when torchrec's modules ask torch.fx whether they are being traced
FX_TRACING = ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both fx.symbolic_trace and torch.export")


def _not_fx_tracing_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(FX_TRACING[1])


def mute_known_warnings() -> None:
    """Mute what torch and torchrec warn about in every run that nothing here can change."""
    warnings.filterwarnings("ignore", message=SHARDED_TENSOR_DEPRECATION, category=FutureWarning)
    fx_logger = logging.getLogger(FX_TRACING[0])
    if _not_fx_tracing_notice not in fx_logger.filters:
        fx_logger.addFilter(_not_fx_tracing_notice)
