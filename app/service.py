"""The served model's life (loading, ready, failed, stopping, hot swaps) and one transcription from upload to
`Outcome`.

Loading runs in a worker thread started by the lifespan, which returns at once: the server answers `/healthz`
and `/readyz` (503) while the model loads, instead of refusing connections. Every step after admission runs
against the request's deadline (`request_timeout_s` from admission) and, once the body is read, against the
client's disconnect: whichever comes first ends the request and drops its queued windows.

`activate(name)` loads another model from `MODELS_DIR` beside the served one and swaps it in through the batcher:
requests admitted before the swap finish on the old model, and the old model is let go once the last of them is
answered. A model that fails to load changes nothing. The swap lasts until restart; `LITEASR_MODEL` says what a
fresh process serves.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi.responses import StreamingResponse
from starlette.requests import Request
from starlette.types import Receive

from app.batching import Batcher, Ticket
from app.config import Settings
from app.errors import (
    ActivationFailed,
    ClientGone,
    Conflict,
    NotReady,
    RequestTimedOut,
    ServiceError,
    ShuttingDown,
)
from app.formats import Outcome
from app.metrics import Metrics
from app.registry import ModelRegistry
from app.schemas import Timings
from app.streaming import TextDeltas, stream_transcription
from app.uploads import Upload, read_upload
from liteasr.audio import SAMPLE_RATE, Window, decode_audio, split_windows
from liteasr.decoding import DecodeOptions, Transcription, stitch
from liteasr.engine import Engine, SpeechEngine, StepScheduler, resolve_device
from liteasr.vad import VadOptions, VoiceActivityDetector, vad_windows

__all__ = ["Service"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Status = Literal["loading", "ready", "failed", "stopping"]


class Service:
    """What the routes use: admission, upload reading, transcription; plus the state behind /healthz, /readyz."""

    def __init__(self, settings: Settings, metrics: Metrics, *, engine: SpeechEngine | None = None) -> None:
        """`engine`: serve this one instead of loading `settings.model` (tests hand in a stand-in)."""
        self.settings = settings
        self._given_engine = engine
        self.metrics = metrics
        self.registry = ModelRegistry(settings.models_dir)
        self.model_name = settings.model_name
        model_dir = Path(settings.model)
        self.model_path: Path | None = model_dir.resolve() if model_dir.is_dir() else None
        self.created = int(time.time())
        self.status: Status = "loading"
        self.failure: str | None = None  # why status is "failed"
        self.on_fatal: Callable[[], None] | None = None  # ends the process when serving cannot go on
        self.batcher: Batcher | None = None
        self._loader: asyncio.Task | None = None
        self._activating = False
        self._releases: set[asyncio.Task] = set()
        self._vad_detector: VoiceActivityDetector | None = None
        self.realtime_sessions = 0  # open /v1/realtime WebSockets (app.realtime)
        self._detector_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model in the background; `status` becomes `ready` or `failed`."""
        self._loader = asyncio.create_task(self._load(), name="liteasr-load")

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            engine, scheduler = await asyncio.to_thread(self._prepare, self.settings.model, self.model_name)
        except Exception:
            logger.exception("the model %s failed to load", self.settings.model)
            self.status, self.failure = "failed", "the model failed to load; see the server log"
            return
        if self.status == "stopping":
            return
        s = self.settings
        self.batcher = Batcher(
            engine, scheduler, self.metrics, max_queue=s.max_queue, retry_after_max_s=s.retry_after_max_s
        )
        self.batcher.start(on_death=self._worker_died)
        self._describe(engine)
        if engine.info.device.startswith("cuda"):
            self.metrics.watch_gpu(engine.info.device)
        seconds = time.perf_counter() - started
        self.metrics.model_load_seconds.set(seconds)
        self.metrics.ready.set(1)
        self.status = "ready"
        info = engine.info
        logger.info(
            "serving %s on %s (%s%s), loaded and warmed in %.1f s",
            info.name,
            info.device,
            info.quantization or info.dtype,
            f", encoder {info.encoder_dtype}" if info.encoder_dtype else "",
            seconds,
        )

    def _prepare(self, source: str | Path, name: str) -> tuple[SpeechEngine, StepScheduler]:
        """Worker thread: load (unless an engine was handed in), warm up, and allocate the decoder slots."""
        engine = self._given_engine
        if engine is None or source != self.settings.model:
            device, _ = resolve_device(self.settings.device)
            int8 = self.settings.int8 if self.settings.int8 != "off" and device.type == "cpu" else None
            engine = Engine.load(
                source,
                device=str(device),
                cache_dir=self.settings.cache_dir,
                int8=int8,
                bf16=self.settings.bf16 if device.type == "cpu" and int8 != "all" else None,
                name=name,
            )
        scheduler = engine.scheduler(max_rows=self.settings.max_batch_size)
        if self.settings.vad:
            self.detector()
        if self.settings.warmup:
            engine.warmup(scheduler)
        return engine, scheduler

    def _describe(self, engine: SpeechEngine) -> None:
        info = engine.info
        self.metrics.model_info.info(
            {
                "model": info.name,
                "device": info.device,
                "dtype": info.dtype,
                "encoder_dtype": info.encoder_dtype or info.dtype,
                "quantization": info.quantization or "none",
                "encoder_parameters": str(info.encoder_parameters),
                "multilingual": str(info.multilingual).lower(),
            }
        )
        self.metrics.models_loaded.set(self.batcher.engines_loaded if self.batcher else 1)

    async def activate(self, name: str) -> tuple[str, float]:
        """Serve the model `MODELS_DIR/<name>` from now on; returns (previous name, load seconds).

        404 for an unknown name, 409 while another activation runs, 422 if it fails to load (nothing changes).
        """
        entry = self.registry.get(name)
        if self.status != "ready" or self.batcher is None:
            raise NotReady(f"cannot activate a model while the service is {self.status}", retry_after=5)
        if self._activating:
            raise Conflict("another model activation is under way", code="activation_in_progress")
        self._activating = True
        try:
            started = time.perf_counter()
            try:
                engine, scheduler = await asyncio.to_thread(self._prepare, entry.path, name)
            except Exception as error:
                self.metrics.model_activations.labels("failed").inc()
                logger.exception("model %s failed to load; %s keeps serving", name, self.model_name)
                reason = self.registry.redact(str(error) or type(error).__name__, self.settings.cache_dir)
                raise ActivationFailed(
                    f"model {name!r} failed to load ({reason[:500]}); {self.model_name!r} keeps serving"
                ) from None
            if self.status != "ready":
                raise ShuttingDown("the server is shutting down", retry_after=self.settings.retry_after_max_s)
            seconds = time.perf_counter() - started
            retired = self.batcher.swap(engine, scheduler)
            previous, self.model_name = self.model_name, name
            self.model_path, self.created = entry.path, entry.created
            self._describe(engine)
            self.metrics.model_activations.labels("succeeded").inc()
            release = asyncio.create_task(self._release(retired, previous))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
            logger.info("now serving %s (was %s), loaded in %.1f s", name, previous, seconds)
            return previous, seconds
        finally:
            self._activating = False

    async def _release(self, retired: asyncio.Event, name: str) -> None:
        """Once the swapped-out model has answered its last request, give its memory back."""
        await retired.wait()
        await asyncio.to_thread(gc.collect)
        if self.batcher is not None:
            self.batcher.engine.release_cached_memory()
            self.metrics.models_loaded.set(self.batcher.engines_loaded)
        logger.info("released model %s", name)

    def models(self) -> list[tuple[str, int, bool]]:
        """(name, created, active) of the served model, then of the other models in `MODELS_DIR`."""
        listed = [(self.model_name, self.created, True)]
        listed += [(e.name, e.created, False) for e in self.registry.list() if e.path != self.model_path]
        return listed

    def _worker_died(self, error: BaseException) -> None:
        """The batch worker cannot be revived in place: fail readiness and liveness and end the process, so its
        supervisor starts a fresh one instead of a server that admits requests it can never answer."""
        self.status, self.failure = "failed", f"the batch worker died ({type(error).__name__}); restarting"
        self.metrics.ready.set(0)
        if self.on_fatal is not None:
            self.on_fatal()

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests (503) from now on; admitted ones go on."""
        if self.status != "failed":
            self.status = "stopping"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.stop_admitting()

    async def stop(self, grace_s: float) -> None:
        """Finish admitted requests (up to `grace_s`), then stop the batch worker."""
        self.begin_shutdown()
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()  # the load thread itself cannot be interrupted; its result is dropped
        if self.batcher is not None:
            await self.batcher.close(grace_s)

    def liveness(self) -> tuple[bool, str]:
        if self.status == "failed":
            return False, self.failure or "failed"
        if self.batcher is not None and not self.batcher.alive and self.status == "ready":
            return False, "the batch worker stopped"
        return True, "ok"

    # -- one request ----------------------------------------------------------------------------------------

    def admit(self) -> Ticket:
        """A ticket for one request, or 503: queue full, model not ready, or shutting down."""
        if self.status == "stopping":
            raise ShuttingDown("the server is shutting down", retry_after=self.settings.retry_after_max_s)
        if self.status == "failed":
            raise NotReady(self.failure or "failed", retry_after=self.settings.retry_after_max_s)
        if self.batcher is None:
            raise NotReady("the model is still loading", retry_after=5)
        return self.batcher.admit()

    async def read_upload(self, ticket: Ticket, request: Request) -> Upload:
        """The multipart body, refused with 413 past `max_upload_mb`, within the request's deadline."""
        remaining = ticket.admitted_at + self.settings.request_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(
                read_upload(request, max_bytes=self.settings.max_upload_bytes), remaining
            )
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    def check_options(self, ticket: Ticket | None, options: DecodeOptions) -> None:
        """InvalidOptionError (400) when the ticket's model (None: the one served now) cannot honour `options`;
        runs before the audio is decoded."""
        if self.batcher is None:
            raise NotReady("the model is still loading", retry_after=5)
        self.batcher.check_options(options, None if ticket is None else ticket.engine)

    async def stream(
        self,
        ticket: Ticket,
        request: Request,
        data: bytes,
        options: DecodeOptions,
        done: Callable[[Outcome], dict[str, Any]],
        *,
        vad: VadOptions | None = None,
    ) -> StreamingResponse:
        """`transcribe` as Server-Sent Events (`app.streaming`); the ticket is released when the transcription
        ends, not when the route returns. `done(outcome)`: the body of the last event."""
        ticket.keep_open()

        def start(on_text: Callable[[str], None]) -> asyncio.Task[Outcome]:
            task = asyncio.ensure_future(
                self.transcribe(ticket, request, data, options, vad=vad, on_text=on_text)
            )
            task.add_done_callback(lambda _: ticket.release())
            return task

        response = await stream_transcription(start, done, self.metrics)
        self.metrics.stream_first_event.observe(time.monotonic() - ticket.admitted_at)
        return response

    async def transcribe(
        self,
        ticket: Ticket,
        request: Request,
        data: bytes,
        options: DecodeOptions,
        *,
        vad: VadOptions | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Outcome:
        """Decode the upload off the event loop, queue its windows, stitch their results in order. `vad`: cut the
        audio into windows of speech (`vad_options`); `on_text`: called with each piece of the transcript as it
        decodes, in order (`app.streaming.TextDeltas`)."""
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            return await self.transcribe_prepared(
                ticket, functools.partial(self._decode, data, vad), options, on_text=on_text, gone=watcher
            )
        finally:
            watcher.cancel()

    async def transcribe_prepared(
        self,
        ticket: Ticket,
        prepare: Callable[[], tuple[float, list[Window]]],
        options: DecodeOptions,
        *,
        on_text: Callable[[str], None] | None = None,
        gone: asyncio.Future,
    ) -> Outcome:
        """`transcribe` for any source: `prepare()` (run in a worker thread) gives the audio's length and windows;
        `gone` completes when nobody waits for the answer any more (499)."""
        assert self.batcher is not None
        deadline = ticket.admitted_at + self.settings.request_timeout_s
        decode_started = time.monotonic()
        duration, windows = await self._until(asyncio.to_thread(prepare), deadline, gone)
        decode_s = time.monotonic() - decode_started
        if not windows:  # no samples, or no speech: nothing to decode
            transcription = Transcription(
                text="", language=options.language or "en", duration=duration, windows=0
            )
            self.metrics.audio_seconds.inc(duration)
            total_s = time.monotonic() - ticket.admitted_at
            timings = Timings(queue_wait_s=0, inference_s=0, batch_size=0, decode_s=decode_s, total_s=total_s)
            return Outcome(transcription, ticket.engine.info.name, options.task, timings)
        deltas = None if on_text is None else TextDeltas(ticket.engine.text, len(windows), on_text)
        job = self.batcher.submit(
            [window.samples for window in windows],
            options,
            ticket,
            on_token=None if deltas is None else deltas.token,
        )
        if deltas is not None:
            for index, future in enumerate(job.futures):
                future.add_done_callback(functools.partial(_window_done, deltas, index))
        try:
            outcomes = await self._until(job.results(), deadline, gone)
        except ServiceError as error:
            job.cancel(error.reason or "failed")
            raise
        except asyncio.CancelledError:
            job.cancel("client_gone")
            raise
        except Exception:
            job.cancel("failed")
            raise
        if deltas is not None and deltas.revised:
            self.metrics.stream_revisions.inc(deltas.revised)
        transcription = stitch(windows, [o.result for o in outcomes], duration)
        self.metrics.audio_seconds.inc(duration)
        first_start = min(o.started for o in outcomes)
        timings = Timings(
            queue_wait_s=round(min(o.queue_wait_s for o in outcomes), 4),
            inference_s=round(max(o.finished for o in outcomes) - first_start, 4),
            batch_size=max(o.max_rows for o in outcomes),
            decode_s=round(decode_s, 4),
            total_s=round(time.monotonic() - ticket.admitted_at, 4),
        )
        return Outcome(transcription, ticket.engine.info.name, options.task, timings)

    def _decode(self, data: bytes, vad: VadOptions | None) -> tuple[float, list[Window]]:
        """Worker thread: bytes -> 16 kHz mono -> windows of at most 30 s (none for an empty file). With `vad`:
        windows of speech only, cut at speech boundaries; without: cut at the quietest point near every 30 s."""
        return self.windows(decode_audio(data, max_seconds=self.settings.max_audio_seconds), vad)

    def windows(self, audio: np.ndarray, vad: VadOptions | None) -> tuple[float, list[Window]]:
        """Worker thread: 16 kHz mono samples -> (seconds, windows of at most 30 s)."""
        if not len(audio):
            return 0.0, []
        duration = len(audio) / SAMPLE_RATE
        if vad is None:
            return duration, split_windows(audio)
        windows = vad_windows(audio, self.detector(), vad)
        self.metrics.vad_skipped_seconds.inc(duration - sum(len(w.samples) for w in windows) / SAMPLE_RATE)
        return duration, windows

    def detector(self) -> VoiceActivityDetector:
        """The VAD model, loaded once (at startup when LITEASR_VAD is on, else on the first request asking)."""
        with self._detector_lock:
            if self._vad_detector is None:
                self._vad_detector = VoiceActivityDetector()
            return self._vad_detector

    def vad_options(self, chunking: VadOptions | Literal["auto", "none"] | None) -> VadOptions | None:
        """A request's `chunking_strategy` -> the VAD options to cut its audio with (None: no VAD)."""
        if chunking is None:
            return VadOptions() if self.settings.vad else None
        if chunking == "auto":
            return VadOptions()
        if chunking == "none":
            return None
        return chunking

    async def _until(self, awaitable: Awaitable[T], deadline: float, disconnected: asyncio.Future) -> T:
        """The awaitable's result, unless the deadline passes (504) or the client leaves (499) first."""
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait(
                {task, disconnected},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if task in done:
                return task.result()
            if disconnected in done:
                raise ClientGone("the client closed the connection")
            raise self._timed_out()
        finally:
            if not task.done():
                task.cancel()

    def _timed_out(self) -> RequestTimedOut:
        return RequestTimedOut(
            f"no answer within {self.settings.request_timeout_s:g} s of admission (LITEASR_REQUEST_TIMEOUT_S)"
        )


def _window_done(deltas: TextDeltas, index: int, future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        deltas.window_done(index, future.result().result.text)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client closes the connection (call only after the request body was read)."""
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
    except Exception:  # a server that cannot tell: never report a disconnect
        logger.debug("cannot watch for the client's disconnect", exc_info=True)
        await asyncio.Event().wait()
