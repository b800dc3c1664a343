"""StopSignals in a real process: the first SIGTERM asks for a stop, a copy of it right after
(torchrun passing on what every process of a Slurm step got) changes nothing, and a second
request after REPEAT_WINDOW_S ends the process the default way."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from services.trainer.stop_signals import REPEAT_WINDOW_S
from tests.factories.training import ROOT

PROCESS = """
import time
from services.trainer.stop_signals import StopSignals

stop = StopSignals().install()
print("ready", flush=True)
while not stop.requested:
    time.sleep(0.01)
print("stop requested", flush=True)
time.sleep(60)  # "checkpointing"
"""


def test_a_copy_of_the_signal_is_the_same_request_and_a_later_one_kills():
    process = subprocess.Popen(
        [sys.executable, "-c", PROCESS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)  # the copy
        lines = iter(process.stdout.readline, "")
        assert "stop requested\n" in lines  # after the handler's warning
        time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
        time.sleep(REPEAT_WINDOW_S)
        process.send_signal(signal.SIGTERM)  # a second request
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()
