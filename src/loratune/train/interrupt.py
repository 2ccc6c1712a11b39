"""Graceful stop on SIGINT/SIGTERM: finish the current step, save a checkpoint, exit with how to resume.

The handlers only set a flag that the loop reads between steps, so a signal never lands in the middle
of an optimizer update or a save. A second Ctrl-C means "now": it raises KeyboardInterrupt at once;
checkpoints are atomic, so even that loses at most the steps since the last one. The previous handlers
are put back on exit. Outside the main thread (e.g. a program that runs `train` in a worker thread)
signals cannot be caught, and the stop is only available through `request()`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into a stop request."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, name: str = "stop request") -> None:
        self.signal_name = self.signal_name or name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def exit_code(self) -> int:
        """128 + signal number, the shell's convention for a process ended by a signal."""
        for sig in _SIGNALS:
            if sig.name == self.signal_name:
                return 128 + int(sig)
        return 1

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
