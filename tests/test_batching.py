"""The batcher (and the service's deadlines) against a stand-in step engine: rows decoding together, failure
isolation, cancellation of queued and decoding windows, the token stream, hot swap, timeouts and clients that leave.

The real scheduler runs in tests/test_scheduler.py and the real service in tests/test_service.py; here a fake
scheduler makes the rare paths (a window that breaks the model, a scheduler bug, a dead worker) happen on demand and
records every iteration. Each window carries its id in its first sample and how many steps it takes in its second.
"""

from __future__ import annotations

import asyncio
import gc
import io
import threading
import time
import weakref
from collections import deque

import numpy as np
import pytest
import soundfile as sf
from starlette.requests import Request

from app.batching import Batcher
from app.config import Settings
from app.errors import ClientGone, QueueFull, RequestTimedOut, ShuttingDown, TranscriptionFailed
from app.metrics import Metrics
from app.service import Service
from liteasr.decoding import DecodeOptions, TokenEvent, WindowResult
from liteasr.engine import ModelInfo
from liteasr.scheduler import Finished, Iteration, PassStats

OPTIONS = DecodeOptions()


class FakeScheduler:
    """Admits waiting windows into `max_rows` rows (arrival order), one token per row per iteration; a window's
    text is its id; an id < 0 fails its window at admission (after a retry, as the real one reports)."""

    def __init__(self, engine: FakeEngine, max_rows: int) -> None:
        self.engine = engine
        self.max_rows = max_rows
        self.queue: deque = deque()
        self.rows: list[list] = []  # [window id, text id, steps left, key, listen, admitted at]
        self.steps: list[list[int]] = []  # the text ids of the rows of every decode step
        self._next = 0

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.rows

    def add(self, samples, options, *, key=None, listen=False) -> int:
        self._next += 1
        self.queue.append([self._next, int(samples[0]), int(samples[1]), key, listen, time.monotonic()])
        return self._next

    def cancel(self, key) -> tuple[int, int]:
        dropped = [w for w in self.queue if w[3] is key]
        freed = [r for r in self.rows if r[3] is key]
        self.queue = deque(w for w in self.queue if w[3] is not key)
        self.rows = [r for r in self.rows if r[3] is not key]
        return len(dropped), len(freed)

    def run_once(self) -> Iteration:
        engine = self.engine
        engine.gate.wait(10)
        if engine.crash is not None:
            error, engine.crash = engine.crash, None
            raise error
        time.sleep(engine.delay)
        report = Iteration()
        while self.queue and len(self.rows) < self.max_rows:
            window = self.queue.popleft()
            report.admitted.append((window[0], 0.0))
            if window[1] < 0:
                report.retries.append("error")
                report.failed.append((window[0], RuntimeError("this window breaks the model")))
            else:
                self.rows.append(window)
        if self.rows:
            self.steps.append([row[1] for row in self.rows])
            report.step = PassStats(0.001, len(self.rows))
            for row in self.rows:
                row[2] -= 1
                if row[4]:
                    report.tokens.append(TokenEvent(row[0], 0, row[1]))
            for row in [r for r in self.rows if r[2] <= 0]:
                self.rows.remove(row)
                result = WindowResult(
                    text=str(row[1]),
                    language="en",
                    segments=(),
                    tokens=(row[1],),
                    avg_logprob=0.0,
                    compression_ratio=1.0,
                    no_speech_prob=0.0,
                    temperature=0.0,
                    looped=False,
                )
                report.finished.append(Finished(row[0], result, row[5], time.monotonic(), report.step.size))
        return report


class FakeEngine:
    """The stand-in model: `gate` holds every iteration, `delay` slows it, `crash` makes the next one raise."""

    info = ModelInfo("fake", "cpu", "float32", None, 1, False, ("en",))

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.crash: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.schedulers: list[FakeScheduler] = []

    def check_options(self, options: DecodeOptions) -> None:
        pass

    def scheduler(self, *, max_rows: int = 8, encoder_batch: int | None = None) -> FakeScheduler:
        self.schedulers.append(FakeScheduler(self, max_rows))
        return self.schedulers[-1]

    def warmup(self, scheduler=None) -> None:
        pass

    def release_cached_memory(self) -> None:
        pass

    @property
    def steps(self) -> list[list[int]]:
        return [step for scheduler in self.schedulers for step in scheduler.steps]


def window(i: int, steps: int = 2) -> np.ndarray:
    return np.array([i, steps] + [0] * 158, dtype=np.float32)


def make(engine: FakeEngine, *, max_rows: int = 8, **kwargs) -> tuple[Batcher, Metrics]:
    metrics = Metrics(max_rows)
    batcher = Batcher(engine, engine.scheduler(max_rows=max_rows), metrics, **kwargs)
    batcher.start()
    return batcher, metrics


def texts(outcomes) -> list[str]:
    return [o.result.text for o in outcomes]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_concurrent_requests_decode_in_the_same_steps():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()  # let all three arrive before the first iteration
        batcher, metrics = make(engine)
        jobs = [batcher.submit([window(i)], OPTIONS) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        assert [texts(await job.results()) for job in jobs] == [["1"], ["2"], ["3"]]
        assert engine.steps == [[1, 2, 3], [1, 2, 3]]
        assert sample(metrics, "liteasr_decode_step_rows_sum") == 6
        assert (
            sample(metrics, "liteasr_windows_total") == 3
            and sample(metrics, "liteasr_model_busy_seconds_total") > 0
        )
        outcome = (await jobs[0].results())[0]
        assert outcome.max_rows == 3 and outcome.queue_wait_s >= 0
        await batcher.close(1)

    asyncio.run(main())


def test_windows_come_back_in_order_whatever_order_they_finish_in():
    async def main():
        engine = FakeEngine()
        batcher, _ = make(engine, max_rows=3)
        job = batcher.submit([window(i, steps=10 - i) for i in range(10)], OPTIONS)
        assert texts(await job.results()) == [str(i) for i in range(10)]
        assert max(len(step) for step in engine.steps) == 3
        await batcher.close(1)

    asyncio.run(main())


def test_a_failing_window_fails_alone():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()
        batcher, metrics = make(engine)
        good, bad, other = (batcher.submit([window(i)], OPTIONS) for i in (1, -1, 2))
        await asyncio.sleep(0.05)
        engine.gate.set()
        assert texts(await good.results()) == ["1"]
        assert texts(await other.results()) == ["2"]
        with pytest.raises(TranscriptionFailed):
            await bad.results()
        assert sample(metrics, "liteasr_batch_retries_total", reason="error") == 1
        assert sample(metrics, "liteasr_window_failures_total") == 1
        assert batcher.alive  # the consumer keeps going
        assert texts(await batcher.submit([window(3)], OPTIONS).results()) == ["3"]
        await batcher.close(1)

    asyncio.run(main())


def test_a_scheduler_bug_fails_its_windows_and_the_next_request_gets_a_fresh_scheduler():
    async def main():
        engine = FakeEngine()
        batcher, _ = make(engine)
        engine.crash = RuntimeError("a bug in an iteration")
        with pytest.raises(TranscriptionFailed):
            await batcher.submit([window(1)], OPTIONS).results()
        assert texts(await batcher.submit([window(2)], OPTIONS).results()) == ["2"]
        assert len(engine.schedulers) == 2 and batcher.alive
        await batcher.close(1)

    asyncio.run(main())


def test_a_cancelled_job_drops_its_queued_windows_and_frees_its_rows():
    async def main():
        engine = FakeEngine()
        batcher, metrics = make(engine, max_rows=1)
        decoding = batcher.submit([window(1, steps=10_000), window(2)], OPTIONS)
        for _ in range(100):  # until its first window decodes and the second waits for the row
            await asyncio.sleep(0.01)
            if engine.steps:
                break
        assert batcher.running_windows == 1 and batcher.queued_windows == 1
        decoding.cancel("client_gone")
        with pytest.raises(asyncio.CancelledError):
            await decoding.results()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if batcher.running_windows == 0:
                break
        assert batcher.running_windows == 0 and batcher.queued_windows == 0
        assert sample(metrics, "liteasr_rows_freed_total", reason="client_gone") == 1
        assert sample(metrics, "liteasr_windows_dropped_total", reason="client_gone") == 1
        assert texts(await batcher.submit([window(3)], OPTIONS).results()) == ["3"]
        assert sample(metrics, "liteasr_queue_depth") == 0 and sample(metrics, "liteasr_windows_running") == 0
        await batcher.close(1)

    asyncio.run(main())


def test_the_token_stream_reaches_the_listening_job_only():
    async def main():
        engine = FakeEngine()
        batcher, _ = make(engine)
        heard: list[tuple[int, int]] = []
        listened = batcher.submit(
            [window(7, steps=3), window(8)],
            OPTIONS,
            on_token=lambda index, event: heard.append((index, event.token)),
        )
        other = batcher.submit([window(9)], OPTIONS)
        await listened.results(), await other.results()
        assert sorted(heard) == [(0, 7), (0, 7), (0, 7), (1, 8), (1, 8)]
        await batcher.close(1)

    asyncio.run(main())


def test_admission_limit_retry_after_and_shutdown():
    async def main():
        batcher, metrics = make(FakeEngine(), max_queue=2)
        first, second = batcher.admit(), batcher.admit()
        assert sample(metrics, "liteasr_requests_in_flight") == 2
        with pytest.raises(QueueFull) as full:
            batcher.admit()
        assert full.value.status == 503 and full.value.retry_after >= 1
        first.release()
        first.release()  # idempotent
        with batcher.admit():
            assert batcher.admitted == 2
        assert batcher.admitted == 1
        batcher.stop_admitting()
        with pytest.raises(ShuttingDown):
            batcher.admit()
        second.release()
        assert sample(metrics, "liteasr_requests_in_flight") == 0
        await batcher.close(1)

    asyncio.run(main())


def test_close_finishes_admitted_requests_first():
    async def main():
        engine = FakeEngine(delay=0.1)
        batcher, _ = make(engine)

        async def request() -> list[str]:
            with batcher.admit():
                return texts(await batcher.submit([window(5)], OPTIONS).results())

        answer = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        await batcher.close(grace_s=10)
        assert answer.done() and answer.result() == ["5"]
        assert not batcher.alive

    asyncio.run(main())


def test_a_swap_keeps_admitted_requests_on_the_old_engine_then_lets_it_go():
    async def main():
        old, new = FakeEngine(), FakeEngine()
        old.gate.clear()  # the old engine is busy when the swap comes
        batcher, _ = make(old, max_rows=4)
        before = batcher.admit()
        job_before = batcher.submit([window(1)], OPTIONS, before)
        queued_before = batcher.admit()  # admitted before the swap, its audio arrives after it
        await asyncio.sleep(0.05)

        retired = batcher.swap(new, new.scheduler(max_rows=4))
        after = batcher.admit()
        assert (before.engine, queued_before.engine, after.engine) == (old, old, new)
        job_queued = batcher.submit([window(2)], OPTIONS, queued_before)
        job_after = batcher.submit([window(3)], OPTIONS, after)
        assert batcher.engines_loaded == 2
        old.gate.set()
        results = [texts(await j.results()) for j in (job_before, job_queued, job_after)]
        assert results == [["1"], ["2"], ["3"]]
        old_ids = {i for step in old.steps for i in step}
        assert old_ids == {1, 2} and {i for step in new.steps for i in step} == {3}  # steps never mix engines

        before.release()
        assert not retired.is_set()  # one request admitted before the swap is still open
        queued_before.release()
        await asyncio.wait_for(retired.wait(), 1)
        assert batcher.engines_loaded == 1
        await asyncio.sleep(0.05)  # the consumer lets go of the old scheduler between iterations
        gone = weakref.ref(old)
        del old, before, queued_before, job_before, job_queued
        gc.collect()
        assert gone() is None, "the batcher still holds the swapped-out engine"
        with pytest.raises(ValueError):
            batcher.swap(new, new.scheduler())
        after.release()
        await batcher.close(1)

    asyncio.run(main())


# -- the service's deadline and disconnect handling ----------------------------------------------------------


async def ready_service(engine: FakeEngine, **settings) -> Service:
    """A service handed `engine`, started the way the app's lifespan starts it."""
    service = Service(Settings(max_batch_size=1, **settings), Metrics(1), engine=engine)
    service.start()
    while service.status == "loading":
        await asyncio.sleep(0.01)
    assert service.status == "ready"
    return service


def client_request(disconnect_after: float | None) -> Request:
    """A request whose body was read; its client leaves after `disconnect_after` seconds (None: stays)."""

    async def receive():
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/transcribe", "headers": []}, receive)


def two_seconds_of_wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(32000, dtype=np.float32), 16000, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("disconnect_after", "error", "reason"),
    [(None, RequestTimedOut, "timeout"), (0.1, ClientGone, "client_gone")],
)
def test_a_request_that_ends_early_drops_its_queued_window(disconnect_after, error, reason):
    async def main():
        engine = FakeEngine(delay=0.001)
        service = await ready_service(engine, request_timeout_s=0.5)
        busy = service.batcher.submit([window(1, steps=700)], OPTIONS)  # holds the only decoder row
        await asyncio.sleep(0.05)
        with service.admit() as ticket, pytest.raises(error):
            await service.transcribe(ticket, client_request(disconnect_after), two_seconds_of_wav(), OPTIONS)
        await asyncio.sleep(0.05)  # the scheduler forgets it between two iterations
        assert sample(service.metrics, "liteasr_windows_dropped_total", reason=reason) == 1
        assert service.batcher.queued_windows == 0 and service.batcher.admitted == 0
        assert texts(await busy.results()) == ["1"]
        assert {i for step in engine.steps for i in step} == {1}  # the dropped window never reached the model
        await service.stop(grace_s=1)

    asyncio.run(main())


def test_the_service_answers_with_timings():
    async def main():
        service = await ready_service(FakeEngine())
        with service.admit() as ticket:
            outcome = await service.transcribe(ticket, client_request(None), two_seconds_of_wav(), OPTIONS)
        assert outcome.transcription.text == "0" and outcome.transcription.duration == 2.0
        assert outcome.timings.batch_size == 1 and outcome.timings.total_s >= outcome.timings.inference_s
        assert sample(service.metrics, "liteasr_audio_seconds_total") == 2.0
        service.begin_shutdown()
        with pytest.raises(ShuttingDown):
            service.admit()
        await service.stop(grace_s=1)

    asyncio.run(main())


class WorkerKilled(BaseException):
    """Not an Exception: nothing in the batcher catches it, so it kills the consumer task."""


def test_a_dead_batch_worker_fails_waiting_requests_readiness_and_ends_the_process():
    async def main():
        engine = FakeEngine()
        service = await ready_service(engine)
        fatal = asyncio.Event()
        service.on_fatal = fatal.set
        assert texts(await service.batcher.submit([window(1)], OPTIONS).results()) == ["1"]

        engine.gate.clear()
        running = service.batcher.submit([window(2)], OPTIONS)
        queued = service.batcher.submit([window(3)], OPTIONS)
        engine.crash = WorkerKilled()
        engine.gate.set()
        await asyncio.wait_for(fatal.wait(), 2)  # on_fatal: `python -m app` exits 1 here
        for job in (running, queued):
            with pytest.raises(TranscriptionFailed, match="batch worker"):
                await asyncio.wait_for(job.results(), 2)  # failed, not left hanging
        assert service.liveness()[0] is False and service.status == "failed"
        assert "batch worker died" in service.failure
        assert sample(service.metrics, "liteasr_ready") == 0
        with pytest.raises(ShuttingDown):
            service.batcher.admit()

    asyncio.run(main())
