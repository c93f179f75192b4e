"""The batch queue: the only caller of the model while the service runs.

A request first takes a `Ticket` (admission, bounded by `max_queue`: refused before its upload is even read),
then submits the windows of its audio as one `Job`. The model side is the library's step engine
(`liteasr.scheduler.Scheduler`, one per loaded model): windows join the decoder batch at any step and leave it as
soon as they end, so a short request never waits for a long one's batch to finish. One consumer task drives it:
each turn runs one scheduler iteration (at most one encoder pass, then one decode step over every active row) on a
single worker thread, so the event loop never waits on the model and the scheduler (not thread-safe) has one
caller. Everything that changes a scheduler (new windows, cancellations) is queued and applied between iterations,
on the event loop.

The scheduler hands free decoder slots to the waiting request with the fewest windows admitted so far, so the
windows of a long file interleave with other requests. Failures stay local: the scheduler retries a failed encoder
pass or decode step window by window (out of memory: in halves), and only a window that fails alone fails its
request. A job whose request ends early (client gone, timeout) is cancelled: its queued windows are dropped and its
decoding rows freed before the next step, both counted.

Hot swap (`swap`): a ticket is bound to the engine that was current when it was admitted, and each engine has its
own scheduler (decode steps never mix models); the consumer alternates between schedulers with work, so requests
admitted before a swap finish on the old model while later ones use the new one. The batcher lets go of the old
engine and its scheduler once its last ticket is released; `retired` tells when.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from app.errors import QueueFull, ShuttingDown, TranscriptionFailed
from app.metrics import Metrics
from liteasr.decoding import DecodeOptions, TokenEvent, WindowResult
from liteasr.engine import SpeechEngine, StepScheduler
from liteasr.scheduler import Iteration

__all__ = ["Batcher", "Job", "Ticket", "WindowOutcome"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowOutcome:
    """One decoded window and how it got there."""

    result: WindowResult
    queue_wait_s: float  # seconds from submission to the start of its encoder pass
    started: float  # time.monotonic() when its encoder pass started
    finished: float  # ... and when its last token was decoded
    max_rows: int  # most decoder rows that shared a step with it


class Ticket:
    """A request's place in the service, held from before its upload is read until it is answered.

    `engine` is the model that answers the request: the one served when it was admitted, even if a swap follows.
    """

    def __init__(self, batcher: Batcher, engine: SpeechEngine) -> None:
        self._batcher = batcher
        self._released = False
        self._kept = False
        self.engine = engine
        self.admitted_at = time.monotonic()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._batcher._release(self)

    def keep_open(self) -> None:
        """The answer outlives the `with` block (a stream): leaving it without an error no longer releases the
        ticket; whoever called this releases it."""
        self._kept = True

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if not self._kept or exc_type is not None:
            self.release()


class Job:
    """The windows of one request, on their way through the scheduler of its engine."""

    def __init__(
        self,
        batcher: Batcher,
        engine: SpeechEngine,
        futures: list[asyncio.Future],
        on_token: Callable[[int, TokenEvent], None] | None,
    ) -> None:
        self._batcher = batcher
        self.engine = engine
        self.futures = futures
        self.on_token = on_token  # (index of the window in this job, event)
        self.window_ids: dict[int, int] = {}  # scheduler window id -> index in `futures`, once added
        self.submitted_at = time.monotonic()
        self.cancelled = False

    async def results(self) -> list[WindowOutcome]:
        """Every window's outcome, in submission order; raises the first window's error if one fails."""
        return list(await asyncio.gather(*self.futures))

    def cancel(self, reason: str, error: BaseException | None = None) -> None:
        """Stop waiting for this job's windows; queued ones are dropped and decoding rows freed before the next
        decode step (counted by `reason`)."""
        self._batcher._cancel(self, reason, error)


class Batcher:
    """Owns the engines at request time: admission, the schedulers, failure isolation."""

    def __init__(
        self,
        engine: SpeechEngine,
        scheduler: StepScheduler,
        metrics: Metrics,
        *,
        max_queue: int = 64,
        retry_after_max_s: int = 60,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.retry_after_max_s = retry_after_max_s
        self._schedulers: dict[SpeechEngine, StepScheduler] = {engine: scheduler}
        self._tickets: dict[SpeechEngine, int] = {engine: 0}  # engine -> its unreleased tickets
        self._retiring: dict[SpeechEngine, asyncio.Event] = {}  # swapped-out engines still answering requests
        self._jobs: dict[
            tuple[SpeechEngine, int], tuple[Job, int]
        ] = {}  # (engine, window id) -> (job, index)
        self._inbox: deque[Callable[[], None]] = deque()  # scheduler changes, applied between iterations
        self._inbox_windows = 0  # windows submitted but not yet handed to a scheduler
        self._admitted = 0
        self._accepting = True
        self._changed = asyncio.Event()  # work arrived
        self._idle = asyncio.Event()  # no admitted request
        self._idle.set()
        self._turn = 0  # round robin over the schedulers with work
        self._seconds_per_window = 1.0  # moving average of model time per finished window, for Retry-After
        self._busy_since_finish = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liteasr-engine")
        self._task: asyncio.Task | None = None
        self._on_death: Callable[[BaseException], None] | None = None

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
        self._fail_all(TranscriptionFailed("the batch worker stopped; the server is restarting"))
        if self._on_death is not None:
            self._on_death(error)

    def _fail_all(self, error: BaseException) -> None:
        for job, _ in list(self._jobs.values()):
            for future in job.futures:
                if not future.done():
                    future.set_exception(error)
        self._jobs.clear()

    @property
    def alive(self) -> bool:
        """The consumer task runs (False before `start`, after `close`, or if it died)."""
        return self._task is not None and not self._task.done()

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
        dropped = self.queued_windows
        if dropped:
            self.metrics.windows_dropped.labels("shutting_down").inc(dropped)
        self._fail_all(ShuttingDown("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- admission ------------------------------------------------------------------------------------------

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def queued_windows(self) -> int:
        """Windows waiting for a decoder slot."""
        return self._inbox_windows + sum(s.waiting for s in self._schedulers.values())

    @property
    def running_windows(self) -> int:
        """Windows decoding now."""
        return sum(s.active for s in self._schedulers.values())

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
        self._tickets[self.engine] += 1
        self._idle.clear()
        self.metrics.requests_in_flight.set(self._admitted)
        return Ticket(self, self.engine)

    def _release(self, ticket: Ticket) -> None:
        engine = ticket.engine
        self._admitted -= 1
        self._tickets[engine] -= 1
        if engine is not self.engine and self._tickets[engine] == 0:
            self._retire(engine)
        self.metrics.requests_in_flight.set(self._admitted)
        if self._admitted == 0:
            self._idle.set()

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the windows ahead times the recent model time per window."""
        ahead = self.queued_windows + 1
        return max(1, min(self.retry_after_max_s, math.ceil(ahead * self._seconds_per_window)))

    # -- hot swap -------------------------------------------------------------------------------------------

    def swap(self, engine: SpeechEngine, scheduler: StepScheduler) -> asyncio.Event:
        """Serve requests admitted from now on with `engine`; the event is set once the old one is let go."""
        if engine in self._tickets:
            raise ValueError("this engine is already being served")
        old, self.engine = self.engine, engine
        self._tickets[engine] = 0
        self._schedulers[engine] = scheduler
        self._retiring[old] = retired = asyncio.Event()
        if self._tickets[old] == 0:
            self._retire(old)
        return retired

    def _retire(self, engine: SpeechEngine) -> None:
        del self._tickets[engine]
        self._inbox.append(lambda: self._schedulers.pop(engine, None))  # not while an iteration may use it
        self._changed.set()
        self._retiring.pop(engine).set()

    @property
    def engines_loaded(self) -> int:
        """The current engine plus swapped-out ones still answering requests admitted before the swap."""
        return 1 + len(self._retiring)

    # -- the queue ------------------------------------------------------------------------------------------

    def check_options(self, options: DecodeOptions, engine: SpeechEngine | None = None) -> None:
        """InvalidOptionError when the model (`engine`, else the current one) cannot honour `options`."""
        (engine or self.engine).check_options(options)

    def submit(
        self,
        windows: Sequence[np.ndarray],
        options: DecodeOptions,
        ticket: Ticket | None = None,
        *,
        on_token: Callable[[int, TokenEvent], None] | None = None,
    ) -> Job:
        """Queue the windows of one request, for its ticket's engine (without a ticket: the current one); await
        `job.results()` for their outcomes. `on_token(window index, event)` is called, on the event loop, for
        each token as it is decoded."""
        if not self.alive:
            raise TranscriptionFailed("the batch worker is not running")
        loop = asyncio.get_running_loop()
        engine = self.engine if ticket is None else ticket.engine
        job = Job(self, engine, [loop.create_future() for _ in windows], on_token)
        if windows:
            self._inbox_windows += len(windows)
            self._inbox.append(lambda: self._add(job, windows, options))
            self.metrics.queue_depth.set(self.queued_windows)
            self._changed.set()
        return job

    def _add(self, job: Job, windows: Sequence[np.ndarray], options: DecodeOptions) -> None:
        if job.cancelled:  # counted as dropped by `_cancel` already
            return
        self._inbox_windows -= len(windows)
        scheduler = self._schedulers[job.engine]
        for index, samples in enumerate(windows):
            window_id = scheduler.add(samples, options, key=job, listen=job.on_token is not None)
            job.window_ids[window_id] = index
            self._jobs[(job.engine, window_id)] = (job, index)

    def _cancel(self, job: Job, reason: str, error: BaseException | None) -> None:
        if job.cancelled:
            return
        job.cancelled = True
        for future in job.futures:
            if not future.done():
                if error is None:
                    future.cancel()
                else:
                    future.set_exception(error)
        if not job.window_ids:  # still on its way to the scheduler: it never will be
            if job.futures:
                self._inbox_windows -= len(job.futures)
                self.metrics.windows_dropped.labels(reason).inc(len(job.futures))
                self.metrics.queue_depth.set(self.queued_windows)
            return
        self._inbox.append(lambda: self._forget(job, reason))
        self._changed.set()

    def _forget(self, job: Job, reason: str) -> None:
        """Between iterations: take the job's windows out of its scheduler."""
        for window_id in job.window_ids:
            self._jobs.pop((job.engine, window_id), None)
        scheduler = self._schedulers.get(job.engine)
        if scheduler is None:
            return
        dropped, freed = scheduler.cancel(job)
        if dropped:
            self.metrics.windows_dropped.labels(reason).inc(dropped)
        if freed:
            self.metrics.rows_freed.labels(reason).inc(freed)

    # -- the consumer ---------------------------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            while self._inbox:
                self._inbox.popleft()()
            busy = [(engine, s) for engine, s in self._schedulers.items() if not s.idle]
            self._publish_gauges()
            if not busy:
                self._changed.clear()
                if not self._inbox:
                    await self._changed.wait()
                continue
            turn, self._turn = busy[self._turn % len(busy)], self._turn + 1
            del busy  # hold no engine while idle: a swapped-out one must be let go
            await self._iterate(*turn)
            del turn

    async def _iterate(self, engine: SpeechEngine, scheduler: StepScheduler) -> None:
        started = time.monotonic()
        try:
            report = await asyncio.get_running_loop().run_in_executor(self._executor, scheduler.run_once)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug outside the model: that scheduler's windows fail, the service goes on
            logger.exception("a scheduler iteration failed; failing the windows of %s", engine.info.name)
            await self._fail_engine(engine, TranscriptionFailed("transcription failed"))
            return
        self._deliver(engine, report, time.monotonic() - started)

    async def _fail_engine(self, engine: SpeechEngine, error: BaseException) -> None:
        """Fail every window of `engine` and give it a fresh scheduler (the old one's state is suspect), built on
        the worker thread: allocating its slots takes a while, and the event loop must not wait for it."""
        for (owner, window_id), (job, index) in list(self._jobs.items()):
            if owner is engine:
                del self._jobs[(owner, window_id)]
                if not job.futures[index].done():
                    job.futures[index].set_exception(error)
        if engine in self._schedulers:
            fresh = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                functools.partial(engine.scheduler, max_rows=self._schedulers[engine].max_rows),
            )
            if engine in self._schedulers:  # not retired meanwhile
                self._schedulers[engine] = fresh

    def _publish_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queued_windows)
        self.metrics.windows_running.set(self.running_windows)

    def _deliver(self, engine: SpeechEngine, report: Iteration, seconds: float) -> None:
        metrics = self.metrics
        metrics.model_busy.inc(seconds)
        if report.encoder is not None:
            metrics.encoder_pass_duration.observe(report.encoder.seconds)
            metrics.encoder_pass_windows.observe(report.encoder.size)
        if report.step is not None:
            metrics.decode_step_duration.observe(report.step.seconds)
            metrics.decode_step_rows.observe(report.step.size)
        for reason in report.retries:
            metrics.batch_retries.labels(reason).inc()
        for _, waited in report.admitted:
            metrics.queue_wait.observe(waited)
        for event in report.tokens:
            entry = self._jobs.get((engine, event.window))
            if entry is not None and entry[0].on_token is not None and not entry[0].cancelled:
                entry[0].on_token(entry[1], event)
        for window_id, error in report.failed:
            metrics.window_failures.inc()
            logger.error("a window failed: %s", error, exc_info=error)
            job, index = self._jobs.pop((engine, window_id), (None, 0))
            if job is not None and not job.futures[index].done():
                job.futures[index].set_exception(TranscriptionFailed("transcription failed for this audio"))
                job.cancel("failed")  # its other windows are of no use now
        self._busy_since_finish += seconds
        if report.finished:  # the queue drains at finished windows per second of model time
            per_window = self._busy_since_finish / len(report.finished)
            self._seconds_per_window = 0.8 * self._seconds_per_window + 0.2 * per_window
            self._busy_since_finish = 0.0
        for done in report.finished:
            metrics.windows.inc()
            metrics.decoded_tokens.inc(len(done.result.tokens))
            job, index = self._jobs.pop((engine, done.window), (None, 0))
            if job is None or job.futures[index].done():
                continue
            job.futures[index].set_result(
                WindowOutcome(
                    done.result,
                    done.admitted - job.submitted_at,
                    done.admitted,
                    done.finished,
                    done.max_rows,
                )
            )
        self._publish_gauges()
