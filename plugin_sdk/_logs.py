"""Logs about what other people sent: bounded in rate, so a flood of bad input is a few lines.

Any NATS client can send any bytes to the subjects a plugin serves. Each log line about such a
message is cut to a bounded size where it is built (``_wire.bounded``); this bounds how many lines
a burst makes: at most ``burst`` per ``period`` seconds, then one line saying how many were left
out once the period is over.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["BoundedLog"]


class BoundedLog:
    """A logger front that lets ``burst`` records through per ``period`` and counts the rest."""

    __slots__ = ("_count", "_log", "_period", "_suppressed", "_window", "burst")

    def __init__(self, log: logging.Logger, *, burst: int = 20, period: float = 10.0) -> None:
        self._log = log
        self.burst = burst
        self._period = period
        self._window = 0.0
        self._count = 0
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Records left out in the current period."""
        return self._suppressed

    def _admit(self) -> bool:
        now = time.monotonic()
        if now - self._window >= self._period:
            if self._suppressed:
                self._log.warning("%d more similar messages were not logged in the last %.0fs",
                                  self._suppressed, self._period)
            self._window, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count > self.burst:
            self._suppressed += 1
            return False
        return True

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if self._log.isEnabledFor(logging.INFO) and self._admit():
            self._log.info(msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if self._log.isEnabledFor(logging.WARNING) and self._admit():
            self._log.warning(msg, *args, **kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if self._log.isEnabledFor(logging.ERROR) and self._admit():
            self._log.error(msg, *args, **kwargs)
