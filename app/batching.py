"""The batch queue: the only caller of the engine while the service runs.

A request first takes a `Ticket` (admission, bounded by `max_queue`: refused before its upload is even read),
then submits the windows of its audio as one `Job`. One consumer task forms batches and runs them on a single
worker thread, so the event loop never waits on the model and the engine (not thread-safe) has one caller.

Each slot of a batch goes to the waiting job that has had the fewest windows taken so far (ties: arrival order).
That is round-robin over requests, and a short request that arrives while a long file is being decoded joins the
very next batch instead of waiting for every window of the file. A batch runs when it is full, or when its oldest
window has waited `max_wait_s`, and waits at all only while another admitted request has not queued its windows
yet (it is still uploading or decoding): with nobody else on the way, waiting only adds latency. While the model is
busy windows pile up, so under load batches form at once.

Failures stay local: a batch that raises is retried window by window and only the window that fails again fails
(its request gets an error, the others their transcripts); CUDA out-of-memory splits the batch in halves instead.
A job whose request ends early (client gone, timeout) is cancelled: its queued windows are dropped and counted.

Hot swap (`swap`): a ticket is bound to the engine that was current when it was admitted, and a batch only holds
windows of one engine, so requests admitted before a swap finish on the old model and later ones use the new one.
The batcher lets go of the old engine once its last ticket is released; `retired` tells when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from app.errors import QueueFull, ShuttingDown, TranscriptionFailed
from app.metrics import Metrics
from liteasr.engine import DecodeOptions, WindowResult

__all__ = ["Batcher", "Job", "Ticket", "WindowOutcome"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowOutcome:
    """One decoded window and how it got there."""

    result: WindowResult
    queue_wait_s: float  # seconds from submission to the start of the model call that decoded it
    started: float  # time.monotonic() when that model call started
    finished: float  # ... and when it ended
    batch_size: int  # windows in that model call


@dataclass(frozen=True)
class _Run:
    result: WindowResult
    started: float
    finished: float
    batch_size: int


class _Item:
    __slots__ = ("enqueued", "future", "job", "options", "samples")

    def __init__(self, job: Job, samples: np.ndarray, options: DecodeOptions, future: asyncio.Future) -> None:
        self.job = job
        self.samples = samples
        self.options = options
        self.future = future
        self.enqueued = time.monotonic()


class Ticket:
    """A request's place in the service, held from before its upload is read until it is answered.

    `engine` is the model that answers the request: the one served when it was admitted, even if a swap follows.
    """

    def __init__(self, batcher: Batcher, engine) -> None:
        self._batcher = batcher
        self._released = False
        self.submitted = False  # its windows are queued (or it had none)
        self.engine = engine
        self.admitted_at = time.monotonic()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Job:
    """The windows of one request, waiting in or passing through the queue."""

    def __init__(self, batcher: Batcher, engine) -> None:
        self._batcher = batcher
        self.engine = engine
        self.items: list[_Item] = []
        self.pending: deque[_Item] = deque()
        self.taken = 0  # windows that went into a batch
        self.submitted = time.monotonic()

    async def results(self) -> list[WindowOutcome]:
        """Every window's outcome, in submission order; raises the first window's error if one fails."""
        return list(await asyncio.gather(*(item.future for item in self.items)))

    def cancel(self, reason: str, error: BaseException | None = None) -> int:
        """Drop the windows still queued and stop waiting for the running ones; returns how many were dropped."""
        return self._batcher._cancel(self, reason, error)


class Batcher:
    """Owns the engine at request time: admission, the window queue, batch formation and failure isolation."""

    def __init__(
        self,
        engine,
        metrics: Metrics,
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.02,
        max_queue: int = 64,
        retry_after_max_s: int = 60,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.retry_after_max_s = retry_after_max_s
        self._jobs: list[Job] = []  # jobs with queued windows, in arrival order
        self._pending = 0  # queued windows
        self._admitted = 0
        self._unsubmitted = 0  # admitted requests whose windows are not queued yet
        self._tickets: dict[object, int] = {engine: 0}  # engine -> its unreleased tickets
        self._retiring: dict[object, asyncio.Event] = {}  # swapped-out engines still answering requests
        self._accepting = True
        self._changed = asyncio.Event()  # a window was queued or a job cancelled
        self._idle = asyncio.Event()  # no admitted request
        self._idle.set()
        self._batch_seconds = 1.0  # moving average of one model call, for Retry-After
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liteasr-engine")
        self._task: asyncio.Task | None = None
        self._on_death: Callable[[BaseException], None] | None = None
        self._running: list[asyncio.Future] = []  # futures of the windows in the model call now

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        """Start the consumer; `on_death(error)` is called if it ever dies of an error (never on `close`)."""
        self._on_death = on_death
        self._task = asyncio.create_task(self._consume(), name="liteasr-batcher")
        self._task.add_done_callback(self._consumer_done)

    def _consumer_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        logger.critical("the batch worker died", exc_info=error)
        self.stop_admitting()
        failure = TranscriptionFailed("the batch worker stopped; the server is restarting")
        for job in list(self._jobs):
            job.cancel("failed", failure)
        for future in self._running:
            if not future.done():
                future.set_exception(failure)
        if self._on_death is not None:
            self._on_death(error)

    @property
    def alive(self) -> bool:
        """The consumer task runs (False before `start`, after `close`, or if it died)."""
        return self._task is not None and not self._task.done()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_admitting(self) -> None:
        """New requests get 503 from now on; admitted ones finish."""
        self._accepting = False

    async def close(self, grace_s: float) -> None:
        """Stop admitting, wait up to `grace_s` for admitted requests to finish, then stop the consumer."""
        self.stop_admitting()
        if self._admitted:
            logger.info("waiting up to %.0f s for %d admitted request(s)", grace_s, self._admitted)
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except asyncio.TimeoutError:
                logger.warning(
                    "%d request(s) still running after %.0f s; failing them", self._admitted, grace_s
                )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in list(self._jobs):
            job.cancel("shutting_down", ShuttingDown("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- admission ------------------------------------------------------------------------------------------

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def queued_windows(self) -> int:
        return self._pending

    def admit(self) -> Ticket:
        """A ticket for one request, or QueueFull / ShuttingDown (503 with Retry-After)."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down", retry_after=self.retry_after())
        if self._admitted >= self.max_queue:
            raise QueueFull(
                f"the server is busy: {self._admitted} requests are queued or running (limit {self.max_queue})",
                retry_after=self.retry_after(),
            )
        self._admitted += 1
        self._unsubmitted += 1
        self._tickets[self.engine] += 1
        self._idle.clear()
        self.metrics.requests_in_flight.set(self._admitted)
        return Ticket(self, self.engine)

    def _release(self, ticket: Ticket) -> None:
        engine = ticket.engine
        self._admitted -= 1
        if not ticket.submitted:
            self._mark_submitted(ticket)
        self._tickets[engine] -= 1
        if engine is not self.engine and self._tickets[engine] == 0:
            self._retire(engine)
        self.metrics.requests_in_flight.set(self._admitted)
        if self._admitted == 0:
            self._idle.set()

    # -- hot swap -------------------------------------------------------------------------------------------

    def swap(self, engine) -> asyncio.Event:
        """Serve requests admitted from now on with `engine`; the event is set once the old one is let go."""
        if engine in self._tickets:
            raise ValueError("this engine is already being served")
        old, self.engine = self.engine, engine
        self._tickets[engine] = 0
        self._retiring[old] = retired = asyncio.Event()
        if self._tickets[old] == 0:
            self._retire(old)
        return retired

    def _retire(self, engine) -> None:
        del self._tickets[engine]
        self._retiring.pop(engine).set()

    @property
    def engines_loaded(self) -> int:
        """The current engine plus swapped-out ones still answering requests admitted before the swap."""
        return 1 + len(self._retiring)

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the batches ahead times the recent time per batch."""
        batches_ahead = math.ceil((self._pending + 1) / self.max_batch_size)
        return max(1, min(self.retry_after_max_s, math.ceil(batches_ahead * self._batch_seconds)))

    # -- the queue ------------------------------------------------------------------------------------------

    def check_options(self, options: DecodeOptions, engine=None) -> None:
        """InvalidOptionError when the model (`engine`, else the current one) cannot honour `options`."""
        (engine or self.engine).check_options(options)

    def submit(
        self, windows: Sequence[np.ndarray], options: DecodeOptions, ticket: Ticket | None = None
    ) -> Job:
        """Queue the windows of one request, for its ticket's engine (without a ticket: the current one); await
        `job.results()` for their outcomes."""
        if not self.alive:
            raise TranscriptionFailed("the batch worker is not running")
        loop = asyncio.get_running_loop()
        job = Job(self, self.engine if ticket is None else ticket.engine)
        if ticket is not None and not ticket.submitted:
            self._mark_submitted(ticket)
        for samples in windows:
            item = _Item(job, samples, options, loop.create_future())
            job.items.append(item)
            job.pending.append(item)
        if job.pending:
            self._jobs.append(job)
            self._pending += len(job.pending)
            self.metrics.queue_depth.set(self._pending)
            self._changed.set()
        return job

    def _mark_submitted(self, ticket: Ticket) -> None:
        ticket.submitted = True
        self._unsubmitted -= 1
        self._changed.set()  # a batch waiting for this request can stop waiting

    def _cancel(self, job: Job, reason: str, error: BaseException | None) -> int:
        dropped = len(job.pending)
        if dropped:
            self._jobs.remove(job)
            self._pending -= dropped
            job.pending.clear()
            self.metrics.queue_depth.set(self._pending)
            self.metrics.windows_dropped.labels(reason).inc(dropped)
            self._changed.set()
        for item in job.items:
            if not item.future.done():
                if error is None:
                    item.future.cancel()
                else:
                    item.future.set_exception(error)
        return dropped

    # -- the consumer ---------------------------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            if not self._jobs:
                self._changed.clear()
                await self._changed.wait()
                continue
            # An idle model waits for the batch to fill, but never past the oldest window's deadline, and only
            # while another admitted request is still on its way.
            oldest = min(job.submitted for job in self._jobs)
            remaining = oldest + self.max_wait_s - time.monotonic()
            if self._pending < self.max_batch_size and remaining > 0 and self._unsubmitted > 0:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
                continue
            engine, batch = self._take_batch()
            self._running = [item.future for item in batch]
            try:
                await self._run_batch(engine, batch)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(ShuttingDown("the server is shutting down"))
                raise
            except Exception as error:  # a bug here must not kill the consumer: fail this batch, go on
                logger.exception("batch of %d windows failed outside the model", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(TranscriptionFailed(f"transcription failed: {error}"))

    def _take_batch(self) -> tuple[object, list[_Item]]:
        """Fill a batch slot by slot, each from the job with the fewest windows taken (`min` keeps arrival order),
        among the jobs of the oldest job's engine (after a swap, the old engine's requests go first)."""
        engine = self._jobs[0].engine
        batch: list[_Item] = []
        while len(batch) < self.max_batch_size:
            jobs = [job for job in self._jobs if job.engine is engine]
            if not jobs:
                break
            job = min(jobs, key=lambda j: j.taken)
            batch.append(job.pending.popleft())
            job.taken += 1
            if not job.pending:
                self._jobs.remove(job)
        self._pending -= len(batch)
        self.metrics.queue_depth.set(self._pending)
        return engine, batch

    async def _run_batch(self, engine, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self.metrics.windows_running.set(len(batch))
        try:
            runs = await loop.run_in_executor(
                self._executor,
                self._infer,
                engine,
                [item.samples for item in batch],
                [item.options for item in batch],
            )
        finally:
            self.metrics.windows_running.set(0)
        for item, run in zip(batch, runs, strict=True):
            if item.future.done():  # its request ended while the model ran
                continue
            if isinstance(run, BaseException):
                item.future.set_exception(TranscriptionFailed("transcription failed for this audio"))
            else:
                wait = run.started - item.enqueued
                self.metrics.queue_wait.observe(wait)
                item.future.set_result(
                    WindowOutcome(run.result, wait, run.started, run.finished, run.batch_size)
                )

    # -- the worker thread ----------------------------------------------------------------------------------

    def _infer(
        self, engine, samples: list[np.ndarray], options: list[DecodeOptions]
    ) -> list[_Run | BaseException]:
        """One model call; on failure, halves (out of memory) or one window at a time (any other error)."""
        started = time.monotonic()
        try:
            results = engine.transcribe_windows(samples, options)
        except torch.cuda.OutOfMemoryError as error:
            if len(samples) == 1:
                logger.error("one window ran out of GPU memory on its own")
                self.metrics.window_failures.inc()
                return [error]
            self.metrics.batch_retries.labels("oom").inc()
            logger.warning("batch of %d windows ran out of GPU memory; retrying in halves", len(samples))
            torch.cuda.empty_cache()
            half = len(samples) // 2
            return self._infer(engine, samples[:half], options[:half]) + self._infer(
                engine, samples[half:], options[half:]
            )
        except Exception as error:
            if len(samples) == 1:
                logger.exception("a window failed")
                self.metrics.window_failures.inc()
                return [error]
            self.metrics.batch_retries.labels("error").inc()
            logger.warning("batch of %d windows failed (%s); retrying one by one", len(samples), error)
            return [
                run
                for i in range(len(samples))
                for run in self._infer(engine, samples[i : i + 1], options[i : i + 1])
            ]
        finished = time.monotonic()
        seconds = finished - started
        self.metrics.inference_duration.observe(seconds)
        self.metrics.batch_size.observe(len(samples))
        self.metrics.windows.inc(len(samples))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        return [_Run(result, started, finished, len(samples)) for result in results]
