"""Child-process helpers shared by ``mesh up`` and the nats-server wrapper."""

from __future__ import annotations

import ctypes
import signal
import sys

__all__ = ["child_preexec"]

_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """Run in the child before exec: on Linux, ask for SIGTERM when the parent dies.

    So a ``mesh up`` killed with SIGKILL leaves no nats-server or plugin host behind. (Linux
    delivers it when the *thread* that forked exits; we only fork from the main thread.)
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (musl oddities): best effort only
            return
