"""SIGINT (Ctrl-C) and SIGTERM in a driver: stop within seconds, keep what can be resumed, exit 130 / 143.

While Tune runs, the first signal asks Tune to stop the way its own Ctrl-C handling does (SIGUSR1: it
saves the experiment state one last time and stops the trials); the search then records the trials it
interrupted and raises ``KeyboardInterrupt``. Outside Tune (starting Ray, training the teacher), or on a
second signal, ``KeyboardInterrupt`` is raised at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The process's stop signals; one instance, ``STOP``, as signals belong to the process."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._graceful = False
        self._stopping = ""
        self._active = False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it (130 SIGINT, 143 SIGTERM)."""
        return 128 + int(self.received or signal.SIGINT)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """Handle SIGINT/SIGTERM for the duration (main thread only; elsewhere Python's defaults stay)."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards to Tune's stop (SIGUSR1) instead
        previous = {s: signal.getsignal(s) for s in HANDLED}
        self._active = True
        self.claim()
        try:
            yield self
        finally:
            self._active = False
            for s, handler in previous.items():
                signal.signal(s, handler)

    def claim(self) -> None:
        """(Re)install the handlers: ``ray.init`` installs its own for SIGTERM (print and abort)."""
        if self._active and threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                signal.signal(s, self._handle)

    @contextlib.contextmanager
    def graceful(self, stopping: str = "the trials and saving the search") -> Iterator[None]:
        """Within this block (``Tuner.fit``), the first signal stops Tune instead of raising; the line
        printed then says it is ``stopping`` what."""
        self._graceful, self._stopping = True, stopping
        try:
            yield
        finally:
            self._graceful = False

    def _handle(self, signum: int, frame: object) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and self._graceful and hasattr(signal, "SIGUSR1"):
            print(f"\n[bkd] {signal.Signals(signum).name} received: stopping {self._stopping} "
                  "(a second one stops at once)", flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise KeyboardInterrupt


STOP = StopSignals()


class Interrupted(KeyboardInterrupt):
    """A stop signal ended a phase (the teacher's training, a search): ``what`` ended and what is ``kept``."""

    def __init__(self, what: str, kept: str) -> None:
        super().__init__(what)
        self.what, self.kept = what, kept


class PhaseFailed(Exception):
    """A phase the rest depends on (the teacher's training) failed; the message says why, in one line."""


class OutOfTime(Exception):
    """``tune.time_budget_s`` ran out before a phase the rest depends on (the teacher's training) ended."""

    def __init__(self, what: str, kept: str) -> None:
        super().__init__(what)
        self.what, self.kept = what, kept
