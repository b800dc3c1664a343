"""Several generation engines behind one `GenerationStream`: each prompt goes to the least loaded.

Why: a small verifier's vLLM engine is bound by the one CPU core of its scheduling process long
before the GPU is busy, and engines side by side on the same GPU add up (docs/benchmarks.md).

Invariants: each replica's engine is touched by that replica's own thread only (adds, aborts and
steps, in the order they were asked for), so one engine waiting on its step never holds up the
others; a prompt is checked in the caller's thread before it is queued (a bad one raises there
and nothing is added); a key lives on one replica from `add` until its completion or abort, and a
completion that arrives for a key aborted meanwhile is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Protocol

from services.hidden_states.backends.base import GeneratedSequence, GenerationParams, GenerationStream

logger = logging.getLogger(__name__)

Finished = list[tuple[str, GeneratedSequence]]


class CheckedGenerationStream(GenerationStream, Protocol):
    def check(self, prompt: list[int], params: GenerationParams) -> None:
        """Raise ValueError for a prompt `add` would refuse; touches no engine state."""
        ...


class _Replica:
    """One engine and the thread that alone drives it."""

    def __init__(self, index: int, stream: CheckedGenerationStream, results: queue.Queue) -> None:
        self.index, self.stream, self.load = index, stream, 0
        self._inbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._results = results
        self._thread = threading.Thread(target=self._run, name=f"generation-replica-{index}", daemon=True)
        self._thread.start()

    def send(self, op: tuple | None) -> None:
        self._inbox.put(op)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            # Idle: sleep until there is work. Busy: take what came in since the last step.
            ops = [self._inbox.get()] if self.stream.unfinished == 0 else []
            while True:
                try:
                    ops.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                for op in ops:
                    if op is None:
                        return
                    if op[0] == "add":
                        self.stream.add(*op[1:])
                    else:
                        self.stream.abort(op[1])
                if self.stream.unfinished:
                    finished = self.stream.step()
                    if finished:
                        self._results.put(finished)
            except Exception as exc:
                logger.exception("generation replica %d failed", self.index)
                self._results.put(exc)


class ReplicatedGenerationStream:
    """`GenerationStream` over `streams`, one thread each (see the module docstring)."""

    def __init__(self, streams: Sequence[CheckedGenerationStream], *, poll_s: float = 0.05) -> None:
        if not streams:
            raise ValueError("a replicated generation stream needs at least one engine")
        self.poll_s = poll_s  # longest `step` waits for a completion: the scheduler takes new calls between
        self._results: queue.Queue[Finished | Exception] = queue.Queue()
        self._replicas = [_Replica(i, s, self._results) for i, s in enumerate(streams)]
        self._home: dict[str, _Replica] = {}

    @property
    def replicas(self) -> int:
        return len(self._replicas)

    @property
    def unfinished(self) -> int:
        return len(self._home)

    def add(self, key: str, prompt: list[int], params: GenerationParams) -> None:
        replica = min(self._replicas, key=lambda r: r.load)
        replica.stream.check(prompt, params)
        self._home[key] = replica
        replica.load += 1
        replica.send(("add", key, list(prompt), params))

    def step(self) -> Finished:
        if not self._home:
            return []
        try:
            items = [self._results.get(timeout=self.poll_s)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._results.get_nowait())
            except queue.Empty:
                break
        finished: Finished = []
        for item in items:
            if isinstance(item, Exception):
                raise item  # the scheduler fails every prompt in flight and aborts them
            for key, completion in item:
                replica = self._home.pop(key, None)
                if replica is not None:
                    replica.load -= 1
                    finished.append((key, completion))
        return finished

    def abort(self, keys: Sequence[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for key in keys:
            replica = self._home.pop(key, None)
            if replica is not None:
                replica.load -= 1
                by_replica.setdefault(replica.index, []).append(key)
        for index, own in by_replica.items():
            self._replicas[index].send(("abort", own))

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the threads (their engines are the caller's to shut down)."""
        for replica in self._replicas:
            replica.send(None)
        for replica in self._replicas:
            replica.join(timeout_s)
