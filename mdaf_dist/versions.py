"""The pinned torch / fbgemm-gpu / torchrec matrix, checked before anything imports them.

The three must match exactly (fbgemm-gpu's kernels are built against one torch, torchrec against
one fbgemm-gpu); a mismatch fails deep inside an import or, worse, at the first sharded lookup.
The check reads the installed distributions' versions (importlib.metadata), so it costs no import
of torch, and names in one line what to install.
"""

from __future__ import annotations

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
