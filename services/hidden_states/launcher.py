"""Start the hidden-state service as a child process and wait until it serves.

    with LocalService.start(ServeHiddenStatesConfig(model=..., port=0)) as service:
        train(..., hidden_states_endpoint=[service.address])

`dflash demo` uses this to run the real service beside the trainer on 127.0.0.1; tests use it
to kill and restart services mid-stream. The child is `python -m services.hidden_states.main`
with the config handed over whole (`dflash_core.config_handover`); it prints `READY_LINE
HOST:PORT` once it accepts calls (with `port=0`, the port it picked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dflash_core.config import ServeHiddenStatesConfig
from dflash_core.config_handover import handover_args
from services.hidden_states.main import READY_LINE

REPO_ROOT = Path(__file__).resolve().parents[2]

# Words of a line that says why a child failed. vLLM's engine runs in a process of its own: the
# cause is printed there, long before the service's last lines (a traceback that only says "See
# root cause above").
_CAUSE_WORDS = ("Error", "ERROR", "Exception", "CRITICAL")


def failure_excerpt(output: list[str], *, tail: int = 40, causes: int = 20) -> str:
    """The child's last `tail` lines, after the earlier lines that name an error (the first `causes`)."""
    head, last = output[:-tail], output[-tail:]
    cause = [line for line in head if any(word in line for word in _CAUSE_WORDS)][:causes]
    if not cause:
        return "".join(last)
    skipped = len(head) - len(cause)
    return "".join(cause) + f"[... {skipped} other lines ...]\n" + "".join(last)


class LocalService:
    def __init__(self, process: subprocess.Popen, host: str, port: int, output: list[str]) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.output = output  # every line the child printed, for error messages

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(cls, config: ServeHiddenStatesConfig, **launch_kwargs) -> LocalService:
        """The service of `config`; see `launch` for the keyword arguments."""
        return cls.launch(["-m", "services.hidden_states.main", *handover_args(config)], **launch_kwargs)

    @classmethod
    def launch(
        cls,
        args: list[str],
        *,
        python: str = sys.executable,
        timeout_s: float = 300.0,
        echo: bool = False,
    ) -> LocalService:
        """Run `python *args` from the repository root and wait for the ready line (so any entry
        point that ends in the service works, the `dflash` CLI included). Raises RuntimeError with
        the child's last output if it exits or stays silent past `timeout_s`."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [python, *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        output: list[str] = []
        ready = threading.Event()
        bound: list[str] = []

        def pump() -> None:  # keeps reading, so the child never blocks on a full pipe
            for line in process.stdout:  # type: ignore[union-attr]
                output.append(line)
                if echo:
                    sys.stderr.write(f"[hidden-state service] {line}")
                if line.startswith(READY_LINE) and not ready.is_set():
                    bound.append(line[len(READY_LINE) :].strip())
                    ready.set()

        threading.Thread(target=pump, name="service-output", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(
                    f"`{' '.join(args)}` did not start the hidden-state service (exit code "
                    f"{process.returncode}):\n" + failure_excerpt(output)
                )
        host, _, port = bound[0].rpartition(":")
        return cls(process, host, int(port), output)

    def kill(self) -> None:
        """SIGKILL: the service vanishes mid-stream, as a crashed or preempted host would."""
        self.process.kill()
        self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain, then exit), escalating to SIGKILL after `timeout_s`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
