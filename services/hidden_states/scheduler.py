"""One worker thread that owns the backend, and the queue that feeds it from every stream.

Extract jobs from all streams share one FIFO; the worker takes as many as fit the token budget
(at least one), runs them in one `backend.extract`, checks every result and hands each to its
stream's outbox. Encoding into frames happens in the stream's own thread, so the worker only
computes. Generate jobs go through the same worker, between batches: one backend, one thread,
no locking inside backends.

Memory stays bounded: each stream holds at most `max_pending` samples (queued, computed or being
sent); its reader stops pulling requests off the network beyond that, and HTTP/2 flow control
pushes back on the client.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import torch

from dflash_core.wire.codec import check_finite_nonzero
from services.hidden_states.backends.base import Backend, GeneratedSequence, GenerationParams

logger = logging.getLogger(__name__)


@dataclass
class ComputedSample:
    sample_id: int
    token_ids: torch.Tensor
    layer_ids: list[int]
    tensor: torch.Tensor | None  # [t, len(layer_ids), H]; None on error
    error_code: grpc.StatusCode | None = None
    error: str = ""


class StreamOutbox:
    """What one Extract stream is owed: computed samples in completion order, bounded in count."""

    def __init__(self, max_pending: int) -> None:
        self.results: queue.Queue[ComputedSample | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_pending)
        self.cancelled = threading.Event()

    def reserve(self) -> bool:
        """Block until the stream may hold one more sample; False once the stream is cancelled."""
        while not self.cancelled.is_set():
            if self._slots.acquire(timeout=0.2):
                return True
        return False

    def release(self) -> None:
        self._slots.release()

    def put(self, sample: ComputedSample) -> None:
        self.results.put(sample)

    def close(self) -> None:
        """No more samples will come (the reader saw the end of the requests)."""
        self.results.put(None)


@dataclass
class ExtractJob:
    sample_id: int
    token_ids: torch.Tensor  # [t] int64
    layer_columns: list[int]  # positions in backend.info.layer_ids, in the requested order
    layer_ids: list[int]
    outbox: StreamOutbox


@dataclass
class GenerateJob:
    prompts: list[list[int]]
    params: GenerationParams
    future: Future[list[GeneratedSequence]] = field(default_factory=Future)


class Scheduler:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._extract: queue.Queue[ExtractJob] = queue.Queue()
        self._generate: queue.Queue[GenerateJob] = queue.Queue()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hidden-state-worker", daemon=True)
        self.samples_served = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ producers
    def submit_extract(self, job: ExtractJob) -> None:
        self._extract.put(job)
        with self._wake:
            self._wake.notify()

    def submit_generate(self, prompts: list[list[int]], params: GenerationParams) -> Future:
        job = GenerateJob(prompts=prompts, params=params)
        self._generate.put(job)
        with self._wake:
            self._wake.notify()
        return job.future

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                if self._extract.empty() and self._generate.empty():
                    self._wake.wait(timeout=0.5)
            self._run_generate_jobs()
            batch = self._take_batch()
            if batch:
                self._run_extract(batch)

    def _take_batch(self) -> list[ExtractJob]:
        """FIFO jobs of live streams up to the token budget (always at least one job)."""
        budget = self.backend.info.max_batch_tokens
        batch: list[ExtractJob] = []
        tokens = 0
        while True:
            try:
                job = self._extract.get_nowait()
            except queue.Empty:
                return batch
            if job.outbox.cancelled.is_set():
                continue  # the client went away: its samples are nobody's
            batch.append(job)
            tokens += int(job.token_ids.numel())
            if tokens >= budget:
                return batch

    def _run_extract(self, batch: Sequence[ExtractJob]) -> None:
        try:
            planes = self.backend.extract([job.token_ids for job in batch])
        except Exception as exc:  # the backend failed for the whole batch: each sample says so
            logger.exception("backend extract failed for %d samples", len(batch))
            for job in batch:
                job.outbox.put(_failed(job, grpc.StatusCode.INTERNAL, f"verifier forward failed: {exc}"))
            return
        for job, plane in zip(batch, planes, strict=True):
            tensor = (
                plane[:, job.layer_columns] if job.layer_columns != list(range(plane.shape[1])) else plane
            )
            problem = check_finite_nonzero(tensor, what=f"hidden states of sample {job.sample_id}")
            if problem is not None:
                logger.error("refusing to send %s", problem)
                job.outbox.put(
                    _failed(job, grpc.StatusCode.INTERNAL, f"the verifier produced bad data: {problem}")
                )
                continue
            if tuple(tensor.shape[:2]) != (job.token_ids.numel(), len(job.layer_ids)):
                message = f"backend returned shape {tuple(tensor.shape)} for {job.token_ids.numel()} tokens"
                job.outbox.put(_failed(job, grpc.StatusCode.INTERNAL, message))
                continue
            self.samples_served += 1
            job.outbox.put(
                ComputedSample(
                    sample_id=job.sample_id,
                    token_ids=job.token_ids,
                    layer_ids=job.layer_ids,
                    tensor=tensor.contiguous(),
                )
            )

    def _run_generate_jobs(self) -> None:
        while True:
            try:
                job = self._generate.get_nowait()
            except queue.Empty:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self.backend.generate(job.prompts, job.params))
            except Exception as exc:
                logger.exception("backend generate failed")
                job.future.set_exception(exc)


def _failed(job: ExtractJob, code: grpc.StatusCode, message: str) -> ComputedSample:
    return ComputedSample(
        sample_id=job.sample_id,
        token_ids=job.token_ids,
        layer_ids=job.layer_ids,
        tensor=None,
        error_code=code,
        error=message,
    )
