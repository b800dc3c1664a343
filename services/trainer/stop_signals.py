"""SIGTERM / SIGINT as a request to stop between steps, after a checkpoint.

A scheduler's preemption, `docker stop`, the control plane's cancel and Ctrl-C all arrive as one
of these. Stopping in the middle of an optimizer step would leave nothing consistent to save, so
the handler only records the signal; the training loop looks at it between steps (all ranks
agree through one small all-reduce), writes a checkpoint and returns. A second signal of the
same kind falls through to the default action, so an impatient Ctrl-C Ctrl-C still kills.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> StopSignals:
        """Take over SIGTERM and SIGINT (main thread only; elsewhere this is a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.received = sig
        # The next one of these ends the process the default way.
        signal.signal(sig, signal.SIG_DFL)
        logger.warning("%s received: stopping after the current step, with a checkpoint", sig.name)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()
