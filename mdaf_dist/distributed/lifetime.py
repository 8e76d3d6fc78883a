"""Processes that end with their launcher.

torchrun starts its workers, and TorchX's local scheduler starts torchrun, each in a session of
its own: a launcher killed with SIGKILL takes no child with it, and the orphans would go on
writing into the run's directory while a rerun starts there. On Linux a process can ask the
kernel for a signal when its parent dies (prctl PR_SET_PDEATHSIG; it survives exec): the
workers ask for SIGKILL when torchrun's agent dies, the torchrun of a study's cell when the
study dies, so killing either leaves nothing running. Elsewhere this is a no-op.

    python -m mdaf_dist.distributed.lifetime PARENT_PID COMMAND [ARG ...]

runs COMMAND (exec, same pid) so that it dies with PARENT_PID, or not at all if that process
is gone already.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import List, Optional

PR_SET_PDEATHSIG = 1
# torchrun sets it for the workers it starts, and only for them
TORCHRUN_WORKER_ENV = "TORCHELASTIC_RUN_ID"


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when the thread that started it ends (for
    torchrun and the local scheduler: their main thread, so the process); False where the
    platform has no such request."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def end_with_launcher() -> None:
    """In a worker started by torchrun: die with the agent. A process started by hand (no
    torchrun) is left alone, so that `nohup mdaf train ... &` outlives its shell."""
    if TORCHRUN_WORKER_ENV in os.environ:
        die_with_parent()


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m mdaf_dist.distributed.lifetime PARENT_PID COMMAND [ARG ...]")
    die_with_parent()
    # the parent may have died before the request: then nothing would ever signal this process
    if os.getppid() != int(argv[0]):
        sys.exit(f"mdaf: the launcher (pid {argv[0]}) is gone: {argv[1]} not started")
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main()
