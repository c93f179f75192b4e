"""The batcher (and the service's deadlines) against a stand-in engine: batch formation, fairness, failure
isolation, OOM splitting, dropped windows, timeouts and clients that leave.

The real engine runs in tests/test_service.py; here a fake one makes the rare paths (a window that crashes the
model, CUDA out-of-memory) happen on demand and records every call. Each window carries its id in its samples.
"""

from __future__ import annotations

import asyncio
import gc
import io
import threading
import time
import weakref

import numpy as np
import pytest
import soundfile as sf
import torch
from starlette.requests import Request

from app.batching import Batcher
from app.config import Settings
from app.errors import ClientGone, QueueFull, RequestTimedOut, ShuttingDown, TranscriptionFailed
from app.metrics import Metrics
from app.service import Service
from liteasr.engine import DecodeOptions, WindowResult

OPTIONS = DecodeOptions()


class FakeEngine:
    """Text of a window = its id; id < 0 raises; batches larger than `oom_above` raise CUDA OOM."""

    name = "fake"

    def __init__(self, *, delay: float = 0.0, oom_above: int | None = None) -> None:
        self.delay = delay
        self.oom_above = oom_above
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def check_options(self, options: DecodeOptions) -> None:
        pass

    def transcribe_windows(self, windows, options) -> list[WindowResult]:
        assert len(windows) == len(options)
        self.gate.wait(10)
        ids = [int(w[0]) for w in windows]
        self.calls.append(ids)
        if self.oom_above is not None and len(ids) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if any(i < 0 for i in ids):
            raise RuntimeError("this window breaks the model")
        time.sleep(self.delay)
        return [
            WindowResult(str(i), "en", (), (), 0.0, 1.0, 0.0, 0.0, looped=False)
            for i in ids  # text, language, segments, tokens, avg_logprob, compression_ratio, no_speech, temperature
        ]


def window(i: int) -> np.ndarray:
    return np.full(160, i, dtype=np.float32)


def make(engine: FakeEngine, **kwargs) -> tuple[Batcher, Metrics]:
    metrics = Metrics(kwargs.get("max_batch_size", 8))
    batcher = Batcher(engine, metrics, **{"max_wait_s": 0.0, **kwargs})
    batcher.start()
    return batcher, metrics


def texts(outcomes) -> list[str]:
    return [o.result.text for o in outcomes]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_concurrent_requests_share_one_batch():
    async def main():
        engine = FakeEngine()
        batcher, metrics = make(engine, max_batch_size=8, max_wait_s=0.2)
        jobs = [batcher.submit([window(i)], OPTIONS) for i in (1, 2, 3)]
        results = [texts(await job.results()) for job in jobs]
        assert results == [["1"], ["2"], ["3"]]
        assert engine.calls == [[1, 2, 3]]
        assert sample(metrics, "liteasr_batch_size_sum") == 3
        outcome = (await jobs[0].results())[0]
        assert outcome.batch_size == 3 and outcome.queue_wait_s >= 0
        await batcher.close(1)

    asyncio.run(main())


def test_a_full_batch_does_not_wait_and_an_idle_wait_is_bounded():
    async def main():
        engine = FakeEngine()
        batcher, _ = make(engine, max_batch_size=2, max_wait_s=30.0)
        started = time.monotonic()
        assert texts(await batcher.submit([window(1), window(2)], OPTIONS).results()) == ["1", "2"]
        assert time.monotonic() - started < 5  # full at once: no 30 s wait
        await batcher.close(1)

        engine = FakeEngine()
        batcher, _ = make(engine, max_batch_size=8, max_wait_s=1.0)
        mine, uploading = batcher.admit(), batcher.admit()  # another request is still on its way: wait for it
        started = time.monotonic()
        assert texts(await batcher.submit([window(7)], OPTIONS, mine).results()) == ["7"]
        assert 0.9 <= time.monotonic() - started < 5  # ... but not past max_wait_s
        assert engine.calls == [[7]]
        mine.release()

        started = time.monotonic()  # `uploading` is the only request: nobody to wait for
        assert texts(await batcher.submit([window(8)], OPTIONS, uploading).results()) == ["8"]
        assert time.monotonic() - started < 0.5
        uploading.release()
        await batcher.close(1)

    asyncio.run(main())


def test_windows_come_back_in_order_across_batches():
    async def main():
        engine = FakeEngine()
        batcher, _ = make(engine, max_batch_size=3)
        job = batcher.submit([window(i) for i in range(10)], OPTIONS)
        assert texts(await job.results()) == [str(i) for i in range(10)]
        assert [len(call) for call in engine.calls] == [3, 3, 3, 1]
        await batcher.close(1)

    asyncio.run(main())


def test_a_short_request_does_not_wait_behind_a_long_one():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()  # hold the model on the long request's first batch
        batcher, _ = make(engine, max_batch_size=2)
        long_job = batcher.submit([window(i) for i in range(10, 16)], OPTIONS)
        await asyncio.sleep(0.05)
        short_job = batcher.submit([window(99)], OPTIONS)
        engine.gate.set()
        assert texts(await short_job.results()) == ["99"]
        assert texts(await long_job.results()) == [str(i) for i in range(10, 16)]
        assert engine.calls[0] == [10, 11]
        assert 99 in engine.calls[1]  # the very next batch, not after all six windows
        await batcher.close(1)

    asyncio.run(main())


def test_a_failing_window_fails_alone():
    async def main():
        engine = FakeEngine()
        batcher, metrics = make(engine, max_batch_size=8, max_wait_s=0.2)
        good, bad, other = (batcher.submit([window(i)], OPTIONS) for i in (1, -1, 2))
        assert texts(await good.results()) == ["1"]
        assert texts(await other.results()) == ["2"]
        with pytest.raises(TranscriptionFailed):
            await bad.results()
        assert engine.calls == [[1, -1, 2], [1], [-1], [2]]
        assert sample(metrics, "liteasr_batch_retries_total", reason="error") == 1
        assert sample(metrics, "liteasr_window_failures_total") == 1
        assert batcher.alive  # the consumer keeps going
        assert texts(await batcher.submit([window(3)], OPTIONS).results()) == ["3"]
        await batcher.close(1)

    asyncio.run(main())


def test_cuda_out_of_memory_splits_the_batch_in_halves():
    async def main():
        engine = FakeEngine(oom_above=2)
        batcher, metrics = make(engine, max_batch_size=8, max_wait_s=0.2)
        jobs = [batcher.submit([window(i)], OPTIONS) for i in range(1, 5)]
        assert [texts(await job.results()) for job in jobs] == [["1"], ["2"], ["3"], ["4"]]
        assert engine.calls == [[1, 2, 3, 4], [1, 2], [3, 4]]
        assert sample(metrics, "liteasr_batch_retries_total", reason="oom") == 1
        assert sample(metrics, "liteasr_batch_size_count") == 2  # only the calls that succeeded
        await batcher.close(1)

    asyncio.run(main())


def test_a_cancelled_job_drops_its_queued_windows():
    async def main():
        engine = FakeEngine()
        engine.gate.clear()
        batcher, metrics = make(engine, max_batch_size=1)
        running = batcher.submit([window(1)], OPTIONS)
        await asyncio.sleep(0.05)
        gone = batcher.submit([window(i) for i in (2, 3, 4)], OPTIONS)
        assert batcher.queued_windows == 3
        assert gone.cancel("client_gone") == 3
        assert batcher.queued_windows == 0
        engine.gate.set()
        assert texts(await running.results()) == ["1"]
        with pytest.raises(asyncio.CancelledError):
            await gone.results()
        assert engine.calls == [[1]]
        assert sample(metrics, "liteasr_windows_dropped_total", reason="client_gone") == 3
        assert sample(metrics, "liteasr_queue_depth") == 0
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
        engine = FakeEngine(delay=0.2)
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
        batcher, _ = make(old, max_batch_size=4, max_wait_s=0.0)
        before = batcher.admit()
        job_before = batcher.submit([window(1)], OPTIONS, before)
        queued_before = batcher.admit()  # admitted before the swap, its audio arrives after it
        await asyncio.sleep(0.05)

        retired = batcher.swap(new)
        after = batcher.admit()
        assert (before.engine, queued_before.engine, after.engine) == (old, old, new)
        job_queued = batcher.submit([window(2)], OPTIONS, queued_before)
        job_after = batcher.submit([window(3)], OPTIONS, after)
        assert batcher.engines_loaded == 2
        old.gate.set()
        results = [texts(await j.results()) for j in (job_before, job_queued, job_after)]
        assert results == [["1"], ["2"], ["3"]]
        assert old.calls == [[1], [2]] and new.calls == [[3]]  # a batch never mixes engines

        before.release()
        assert not retired.is_set()  # one request admitted before the swap is still open
        queued_before.release()
        await asyncio.wait_for(retired.wait(), 1)
        assert batcher.engines_loaded == 1
        gone = weakref.ref(old)
        del old, before, queued_before, job_before, job_queued
        gc.collect()
        assert gone() is None, "the batcher still holds the swapped-out engine"
        with pytest.raises(ValueError):
            batcher.swap(new)
        after.release()
        await batcher.close(1)

    asyncio.run(main())


# -- the service's deadline and disconnect handling ----------------------------------------------------------


def ready_service(engine: FakeEngine, **settings) -> Service:
    service = Service(Settings(max_batch_size=1, max_batch_wait_ms=0, **settings), Metrics(1))
    service.batcher = Batcher(engine, service.metrics, max_batch_size=1, max_wait_s=0.0)
    service.batcher.start()
    service.status = "ready"
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
        engine = FakeEngine()
        engine.gate.clear()
        service = ready_service(engine, request_timeout_s=0.5)
        busy = service.batcher.submit([window(1)], OPTIONS)  # holds the model
        await asyncio.sleep(0.05)
        with service.admit() as ticket, pytest.raises(error):
            await service.transcribe(ticket, client_request(disconnect_after), two_seconds_of_wav(), OPTIONS)
        assert sample(service.metrics, "liteasr_windows_dropped_total", reason=reason) == 1
        assert service.batcher.queued_windows == 0 and service.batcher.admitted == 0
        engine.gate.set()
        assert texts(await busy.results()) == ["1"]
        assert engine.calls == [[1]]  # the dropped window never reached the model
        await service.stop(grace_s=1)

    asyncio.run(main())


def test_the_service_answers_with_timings():
    async def main():
        service = ready_service(FakeEngine())
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
        service = Service(Settings(max_batch_size=1, max_batch_wait_ms=0), Metrics(1))
        service.batcher = Batcher(engine, service.metrics, max_batch_size=1, max_wait_s=0.0)
        fatal = asyncio.Event()
        service.on_fatal = fatal.set
        service.batcher.start(on_death=service._worker_died)
        service.status = "ready"
        assert texts(await service.batcher.submit([window(1)], OPTIONS).results()) == ["1"]

        def die(windows, options):
            raise WorkerKilled

        engine.transcribe_windows = die
        running = service.batcher.submit([window(2)], OPTIONS)
        queued = service.batcher.submit([window(3)], OPTIONS)
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
