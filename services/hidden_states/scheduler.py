"""One worker thread that owns the backend, and the queue that feeds it from every stream.

Extract jobs from all streams share one FIFO; the worker runs as many as fit the token budget (at
least one) in one `backend.extract`, checks every result and hands each to its stream, which
encodes it in its own thread. Generate jobs go through the same worker between Extract batches,
merged into one call in slices of the token budget (they slow the trainers, never stop them);
each prompt keeps its request's params and seed, and a failed merged call is rerun job by job. A
backend's `generation_stream` instead gets each job's prompts as they arrive (aborted if the
caller goes away). One backend, one thread: no locking inside backends.
Memory stays bounded: at most `max_pending` samples per stream and `ByteBudget.limit` bytes of
hidden states in all (charged when a request is read, refunded when sent, dropped or cancelled);
past either, readers stop pulling and HTTP/2 flow control pushes back on the client.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import torch

from dflash_core.wire.codec import check_finite_nonzero
from services.hidden_states.backends.base import (
    Backend,
    GeneratedSequence,
    GenerationParams,
    GenerationStream,
    per_prompt_params,
)

logger = logging.getLogger(__name__)


@dataclass
class ComputedSample:
    sample_id: int
    token_ids: torch.Tensor
    layer_ids: list[int]
    tensor: torch.Tensor | None  # [t, len(layer_ids), H]; None on error
    error_code: grpc.StatusCode | None = None
    error: str = ""
    charge: int = 0  # bytes held in the service's ByteBudget until this sample is sent or dropped


class ByteBudget:
    """Bytes of hidden states that all streams may hold at once (queued, computed or being sent)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, cancelled: threading.Event) -> int | None:
        """Wait until `nbytes` fit, then hold them; the bytes held (a sample bigger than the whole
        budget waits until it runs alone), or None once `cancelled` is set."""
        nbytes = min(nbytes, self.limit)
        with self._cond:
            while self.used > 0 and self.used + nbytes > self.limit:
                if cancelled.is_set():
                    return None
                self._cond.wait(timeout=0.2)
            self.used += nbytes
            return nbytes

    def release(self, nbytes: int) -> None:
        if nbytes:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


class StreamOutbox:
    """What one Extract stream is owed: computed samples in completion order, bounded in count
    (`max_pending`) and, with the other streams, in bytes (`budget`)."""

    def __init__(self, max_pending: int, budget: ByteBudget) -> None:
        self.results: queue.Queue[ComputedSample | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._budget = budget
        self._lock = threading.Lock()
        self._drained = False
        self.cancelled = threading.Event()

    def reserve(self, nbytes: int = 0) -> int | None:
        """Block until the stream may hold one more sample of `nbytes`; the bytes charged, or None
        once the stream is cancelled."""
        while not self.cancelled.is_set():
            if self._slots.acquire(timeout=0.2):
                charged = self._budget.acquire(nbytes, self.cancelled)
                if charged is not None:
                    return charged
                self._slots.release()
                return None
        return None

    def release(self, charge: int = 0) -> None:
        """A sample reserved with `reserve` is sent, or will never be: free its slot and bytes."""
        self._slots.release()
        self._budget.release(charge)

    def put(self, sample: ComputedSample) -> None:
        with self._lock:
            if not self._drained:
                self.results.put(sample)
                return
        self.release(sample.charge)  # nobody will send it: the stream is over

    def drain(self) -> None:
        """The stream is over: refund every sample still queued, and any that arrives later."""
        self.cancelled.set()
        with self._lock:
            self._drained = True
            while True:
                try:
                    sample = self.results.get_nowait()
                except queue.Empty:
                    return
                if sample is not None:
                    self.release(sample.charge)

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
    charge: int = 0  # bytes reserved for its result in the service's ByteBudget


@dataclass(eq=False)  # hashed by identity
class GenerateJob:
    prompts: list[list[int]]
    params: GenerationParams
    future: Future[list[GeneratedSequence]] = field(default_factory=Future)
    # Set when the caller is gone (the RPC ended): a streamed job's prompts are then aborted.
    abandoned: threading.Event = field(default_factory=threading.Event)
    # A streamed job's replies as they finish, the keys of its prompts in the stream, and how
    # many of them are still generating.
    replies: list[GeneratedSequence | None] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    unfinished: int = 0

    def abandon(self) -> None:
        self.abandoned.set()
        self.future.cancel()  # a job still queued is dropped at once


class Scheduler:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._extract: queue.Queue[ExtractJob] = queue.Queue()
        self._generate: queue.Queue[GenerateJob] = queue.Queue()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hidden-state-worker", daemon=True)
        self.samples_served = 0
        self._stream: GenerationStream | None = getattr(backend, "generation_stream", None)
        self._streamed: dict[str, tuple[GenerateJob, int]] = {}  # key -> (job, prompt index)
        self._streamed_jobs: set[GenerateJob] = set()  # the jobs those prompts belong to
        self._generating: list[GenerateJob] = []  # without a stream: jobs in progress, oldest first
        self._keys = itertools.count()
        # What Generate cost the backend: jobs served and `backend.generate` calls (merged jobs
        # share one); tests and benchmarks read them.
        self.generate_jobs = 0
        self.generate_calls = 0

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

    def submit_generate(self, prompts: list[list[int]], params: GenerationParams) -> GenerateJob:
        """Queue a Generate request; its replies arrive on `job.future`. Call `job.abandon()`
        when the caller goes away."""
        job = GenerateJob(prompts=prompts, params=params)
        self._generate.put(job)
        with self._wake:
            self._wake.notify()
        return job

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                idle = self._extract.empty() and self._generate.empty()
                if idle and not self._streamed and not self._generating:
                    self._wake.wait(timeout=0.5)
            if self._stream is not None:
                self._step_stream(self._stream)
            else:
                self._run_generate_jobs()
            batch = self._take_batch()
            if batch:
                self._run_extract(batch)
        if self._streamed:  # stopping: nobody will step these any more
            self._fail_streamed(RuntimeError("the service is stopping"))
        for job in self._generating:
            job.future.set_exception(RuntimeError("the service is stopping"))

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
                job.outbox.release(job.charge)  # the client went away: its samples are nobody's
                continue
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
                    charge=job.charge,
                )
            )

    def _take_generate_jobs(self) -> list[GenerateJob]:
        """Every queued Generate job whose caller still waits, marked running."""
        jobs = []
        while True:
            try:
                job = self._generate.get_nowait()
            except queue.Empty:
                return jobs
            if job.future.set_running_or_notify_cancel():
                jobs.append(job)

    def _run_generate_jobs(self) -> None:
        """One slice of the Generate work: prompts of the jobs in progress (oldest first) up to the
        backend's token budget, in one `backend.generate` call. The worker runs an Extract batch
        between slices, so a long Generate call never holds the trainers' streams for its whole
        length; each prompt keeps its own params and seed, so slicing changes no reply."""
        for job in self._take_generate_jobs():
            job.replies = []
            self._generating.append(job)
            self.generate_jobs += 1
        self._generating = [job for job in self._generating if not job.abandoned.is_set()]
        if not self._generating:
            return
        budget = self.backend.info.max_batch_tokens
        parts: list[tuple[GenerateJob, int, int]] = []  # (job, first prompt, end)
        tokens = 0
        for job in self._generating:
            start = end = len(job.replies)
            while end < len(job.prompts) and (
                tokens == 0 or tokens + len(job.prompts[end]) + job.params.max_new_tokens <= budget
            ):
                tokens += len(job.prompts[end]) + job.params.max_new_tokens
                end += 1
            if end > start:
                parts.append((job, start, end))
            if end < len(job.prompts):
                break  # the budget is spent: the rest waits for the next slice
        results: list[list[GeneratedSequence] | Exception]
        try:
            results = list(self._generate_parts(parts))  # a list of either kind
        except Exception as exc:
            if len(parts) == 1:
                logger.exception("backend generate failed")
                results = [exc]
            else:  # one caller's bad request must fail that caller only
                logger.exception("backend generate failed for %d merged jobs; running each alone", len(parts))
                results = [self._generate_alone(part) for part in parts]
        for (job, _, _), result in zip(parts, results, strict=True):
            if isinstance(result, Exception):
                job.future.set_exception(result)
                self._generating.remove(job)
                continue
            job.replies.extend(result)
            if len(job.replies) == len(job.prompts):
                job.future.set_result(list(job.replies))  # type: ignore[arg-type]
                self._generating.remove(job)

    def _generate_alone(self, part: tuple[GenerateJob, int, int]) -> list[GeneratedSequence] | Exception:
        try:
            return self._generate_parts([part])[0]
        except Exception as exc:
            logger.exception("backend generate failed")
            return exc

    def _generate_parts(self, parts: Sequence[tuple[GenerateJob, int, int]]) -> list[list[GeneratedSequence]]:
        """One `backend.generate` call for prompts [start, end) of each job; each part's replies."""
        prompts = [prompt for job, start, end in parts for prompt in job.prompts[start:end]]
        params = [
            p for job, start, end in parts for p in per_prompt_params(job.params, len(job.prompts))[start:end]
        ]
        self.generate_calls += 1
        completions = self.backend.generate(prompts, params)
        if len(completions) != len(prompts):
            raise RuntimeError(
                f"the backend returned {len(completions)} completions for {len(prompts)} prompts"
            )
        replies, first = [], 0
        for _, start, end in parts:
            replies.append(completions[first : first + end - start])
            first += end - start
        return replies

    # ------------------------------------------------------------------ streamed generation
    def _step_stream(self, stream: GenerationStream) -> None:
        """Add the prompts of newly queued jobs, drop those of callers gone, run one step."""
        for job in self._take_generate_jobs():
            self._add_to_stream(stream, job)
        for job in [job for job in self._streamed_jobs if job.abandoned.is_set()]:
            self._drop_from_stream(stream, job)
        if not self._streamed:
            return
        try:
            finished = stream.step()
        except Exception as exc:
            logger.exception("backend generation step failed for %d prompts", len(self._streamed))
            self._fail_streamed(exc)
            return
        for key, completion in finished:
            entry = self._streamed.pop(key, None)
            if entry is None:
                continue
            job, index = entry
            job.replies[index] = completion
            job.unfinished -= 1
            if job.unfinished == 0:
                self._streamed_jobs.discard(job)
                job.future.set_result(list(job.replies))  # type: ignore[arg-type]

    def _add_to_stream(self, stream: GenerationStream, job: GenerateJob) -> None:
        job.replies = [None] * len(job.prompts)
        try:
            for index, (prompt, params) in enumerate(
                zip(job.prompts, per_prompt_params(job.params, len(job.prompts)), strict=True)
            ):
                key = f"dflash-generate-{next(self._keys)}"
                stream.add(key, prompt, params)
                job.keys.append(key)
                job.unfinished += 1
                self._streamed[key] = (job, index)
        except Exception as exc:
            logger.exception("adding a Generate job's prompts to the engine failed")
            self._drop_from_stream(stream, job)
            job.future.set_exception(exc)
            return
        self._streamed_jobs.add(job)
        self.generate_jobs += 1

    def _drop_from_stream(self, stream: GenerationStream, job: GenerateJob) -> None:
        self._streamed_jobs.discard(job)
        keys = [key for key in job.keys if self._streamed.pop(key, None) is not None]
        try:
            stream.abort(keys)
        except Exception:
            logger.exception("aborting %d prompts in the engine failed", len(keys))

    def _fail_streamed(self, exc: BaseException) -> None:
        jobs, self._streamed_jobs = self._streamed_jobs, set()
        if self._stream is not None:
            try:
                self._stream.abort(list(self._streamed))
            except Exception:
                logger.exception("aborting %d prompts in the engine failed", len(self._streamed))
        self._streamed.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)


def _failed(job: ExtractJob, code: grpc.StatusCode, message: str) -> ComputedSample:
    return ComputedSample(
        sample_id=job.sample_id,
        token_ids=job.token_ids,
        layer_ids=job.layer_ids,
        tensor=None,
        error_code=code,
        error=message,
        charge=job.charge,
    )
