"""SIGTERM / SIGINT as a request to stop between steps, after a checkpoint.

A scheduler's preemption, `docker stop`, the control plane's cancel and Ctrl-C all arrive as one
of these. Stopping in the middle of an optimizer step would leave nothing consistent to save, so
the handler only records the signal; the training loop looks at it between steps (all ranks
agree through one small all-reduce), writes a checkpoint and returns. A second signal of the
same kind takes the default action, so an impatient Ctrl-C Ctrl-C still kills.

A repeat within REPEAT_WINDOW_S of the first is the same request arriving twice, and is ignored:
a signal to every process of a job (Slurm's `scancel --signal=TERM`, its time limit and
preemption; a terminal's Ctrl-C to its foreground group) reaches torchrun and its workers at
once, and torchrun passes it on to the workers again a moment later. Taken as the second
signal, that copy would kill every rank without the checkpoint the first one asked for.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# torchrun forwards the signal it got within milliseconds; a person's second Ctrl-C comes later.
REPEAT_WINDOW_S = 2.0


class StopSignals:
    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._received_at: dict[signal.Signals, float] = {}
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
        now = time.monotonic()
        first = self._received_at.get(sig)
        if first is None:
            self._received_at[sig] = now
            self.received = sig
            logger.warning("%s received: stopping after the current step, with a checkpoint", sig.name)
        elif now - first > REPEAT_WINDOW_S:
            # The second request: end the process the default way, as if we had no handler.
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        else:
            logger.info("%s again (the same request, passed on by torchrun): still stopping", sig.name)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()
