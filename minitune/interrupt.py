"""Stopping on a signal: SIGTERM / SIGINT set a flag that the loop reads at a step boundary, agreed
on by every process, so that a preempted run saves a checkpoint and stops cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

__all__ = ["StopFlag"]


class StopFlag:
    """SIGTERM / SIGINT only set a flag; the loop saves and stops at the next step boundary.

    A second signal exits at once, by the signal's default action: no cleanup code runs, so a save
    in progress is abandoned as a `.tmp-` folder and the last complete checkpoint stays as it was.
    """

    def __init__(self) -> None:
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        with contextlib.suppress(ValueError):  # not in the main thread: no handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        # os.write, not print: a handler may interrupt a print to the same stream
        if self.raised is not None:
            os.write(2, f"\n{name} again: exiting now, without saving\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.raised = signum
        os.write(2, f"\n{name}: saving a checkpoint at the end of this step, then stopping "
                    f"(send it again to exit at once, without saving)\n".encode())

    def now(self, agreed: list[bool]) -> bool:
        """Stop at this step boundary? `agreed`: [the flag summed over processes at the step's sync],
        so that every process stops at the same step; empty with one process (the flag as it is now)."""
        return agreed[0] if agreed else self.raised is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
