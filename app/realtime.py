"""Live transcription over OpenAI's Realtime protocol (`GET /v1/realtime?intent=transcription`, a WebSocket).

The client streams PCM16 audio (`input_audio_buffer.append`, base64, 24 kHz or 16 kHz mono). A turn ends when the
client commits it (`turn_detection: null`) or when server VAD (Silero, the same detector as uploads) hears
`silence_duration_ms` of silence after speech; a turn of 30 s of speech is committed at once (one Whisper window).
Each committed turn is transcribed through the service's own path, so it takes a ticket like an upload (admission,
queue limit, deadline, metrics) and shares the decoder batch with uploads; its tokens stream back as
`conversation.item.input_audio_transcription.delta` events, then `.completed`. Turns of a session are transcribed
one after the other, so their events arrive in order.

An extension, only for sessions opened with `?partials=true`: while a turn is still being spoken, it is decoded
again about once a second and `conversation.item.input_audio_transcription.partial` {item_id, transcript} gives
its text so far (each replaces the last; the turn's deltas and `completed` follow as usual). Clients of OpenAI's
protocol that do not ask never see it.

Every server event carries `type` and `event_id`. A malformed event gets an `error` event and the session goes on;
a binary frame (1003), a frame over `MAX_FRAME_BYTES` (1009) or a flood of events (1008) closes it. When the client
vanishes, the turn being transcribed is cancelled (its rows are freed at the next step) and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import soxr
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.errors import error_event
from app.service import Service
from liteasr.audio import SAMPLE_RATE
from liteasr.decoding import DecodeOptions
from liteasr.errors import LiteASRError
from liteasr.vad import FRAME_SAMPLES, VadOptions

__all__ = ["RealtimeSession"]

logger = logging.getLogger(__name__)

RATES = (24000, 16000)  # input rates a session may declare (OpenAI's is 24 kHz)
MAX_FRAME_BYTES = 2 * 2**20  # one event: 2 MiB of JSON is about 30 s of base64 PCM16 at 24 kHz
EVENTS_PER_SECOND, EVENT_BURST = 100.0, 400  # a token bucket: past it the client floods
MAX_TURN_SECONDS = 30.0  # one Whisper window
MIN_COMMIT_SECONDS = 0.1  # OpenAI refuses to commit less than 100 ms
VAD_EVERY_SECONDS = 0.1  # how often the open buffer is scored for speech
VAD_CONTEXT_SECONDS = 2.0  # frames already scored are scored again with this much audio before them
SPEECH_FRAMES = 3  # frames above the threshold in a row that start speech (about 100 ms)
PARTIAL_EVERY_SECONDS = 1.0  # the extension: how often an open turn is decoded again
PARTIAL_EVENT = (
    "conversation.item.input_audio_transcription.partial"  # not OpenAI's: only with ?partials=true
)


@dataclass
class _Config:
    """What `session.update` can set."""

    rate: int = 24000
    language: str | None = None
    prompt: str | None = None
    vad: VadOptions | None = field(default_factory=VadOptions)  # None: the client commits turns itself

    def describe(self, model: str) -> dict[str, Any]:
        turn = None
        if self.vad is not None:
            turn = {
                "type": "server_vad",
                "threshold": self.vad.threshold,
                "prefix_padding_ms": self.vad.prefix_padding_ms,
                "silence_duration_ms": self.vad.silence_duration_ms,
            }
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.rate},
                    "transcription": {"model": model, "language": self.language, "prompt": self.prompt},
                    "turn_detection": turn,
                }
            },
        }


class _Malformed(Exception):
    """A client event we cannot use: answered with an `error` event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_event", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class _Close(Exception):
    def __init__(self, code: int, reason: str, label: str) -> None:
        super().__init__(reason)
        self.code, self.reason, self.label = code, reason, label


class RealtimeSession:
    """One WebSocket: its audio buffer, its turn detection, its turns."""

    def __init__(self, websocket: WebSocket, service: Service, *, partials: bool = False) -> None:
        self.websocket = websocket
        self.service = service
        self.settings = service.settings
        self.metrics = service.metrics
        self.config = _Config()
        self.id = "sess_" + uuid.uuid4().hex[:20]
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._turns: asyncio.Queue[tuple[str, np.ndarray, float] | None] = asyncio.Queue()
        self._gone: asyncio.Future = asyncio.get_running_loop().create_future()
        self._resampler: soxr.ResampleStream | None = None
        self._buffer = np.zeros(0, dtype=np.float32)  # 16 kHz audio not yet committed
        self._buffer_start = 0  # session sample (16 kHz) where the buffer begins
        self._probabilities = np.zeros(0, dtype=np.float32)  # per VAD frame of the buffer
        self._scored_until = 0  # buffer samples scored for speech so far
        self._speech_start: int | None = None  # session sample where the open turn's speech starts
        self._item: str | None = None  # the open turn's item id (speech started)
        self._previous_item: str | None = None
        self._partials = partials  # the extension: captions of the open turn while it is spoken
        self._partial: asyncio.Task | None = None
        self._partial_at = 0  # session sample up to which the last partial decoded
        self._tokens = float(EVENT_BURST)
        self._refilled = time.monotonic()

    # -- the connection -------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.websocket.accept()
        self.service.realtime_sessions += 1
        self.metrics.realtime_sessions.set(self.service.realtime_sessions)
        sender = asyncio.create_task(self._send_loop())
        turns = asyncio.create_task(self._turn_loop())
        try:
            self._emit("session.created", session=self._session())
            await self._receive_loop()
        except _Close as close:
            self.metrics.realtime_closes.labels(close.label).inc()
            with contextlib.suppress(Exception):
                if close.label in ("session_length", "idle"):
                    self._emit_error(close.reason, code=close.label, type_="invalid_request_error")
                    await asyncio.wait_for(self._drain(), 2.0)
                await self.websocket.close(close.code, close.reason)
        except WebSocketDisconnect:
            pass
        finally:
            if not self._gone.done():
                self._gone.set_result(None)  # a turn being transcribed is cancelled: 499, its rows freed
            turns.cancel()
            if self._partial is not None:
                self._partial.cancel()
                await asyncio.gather(self._partial, return_exceptions=True)
            self._outbox.put_nowait(None)
            await asyncio.gather(turns, return_exceptions=True)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.service.realtime_sessions -= 1
            self.metrics.realtime_sessions.set(self.service.realtime_sessions)

    async def _drain(self) -> None:
        while not self._outbox.empty():
            await asyncio.sleep(0.01)

    async def _receive_loop(self) -> None:
        ends = time.monotonic() + self.settings.realtime_max_session_s
        while True:
            timeout = min(self.settings.realtime_idle_timeout_s, ends - time.monotonic())
            if timeout <= 0:
                raise _Close(1000, "the session reached LITEASR_REALTIME_MAX_SESSION_S", "session_length")
            try:
                message = await asyncio.wait_for(self.websocket.receive(), timeout)
            except asyncio.TimeoutError:
                if time.monotonic() >= ends:
                    raise _Close(
                        1000, "the session reached LITEASR_REALTIME_MAX_SESSION_S", "session_length"
                    ) from None
                raise _Close(1000, "no event for LITEASR_REALTIME_IDLE_TIMEOUT_S", "idle") from None
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is not None:
                raise _Close(
                    1003, "binary frames are not part of the protocol; send JSON text", "binary_frame"
                )
            text = message.get("text") or ""
            if len(text) > MAX_FRAME_BYTES:
                raise _Close(1009, f"an event is at most {MAX_FRAME_BYTES} bytes", "too_big")
            self._count_event()
            event_id = None
            try:
                event = json.loads(text)
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    raise _Malformed("an event is a JSON object with a string `type`")
                event_id = event.get("event_id")
                await self._handle(event)
            except ValueError:
                self._emit_error("the event is not valid JSON", code="invalid_json")
            except _Malformed as bad:
                self._emit_error(str(bad), code=bad.code, param=bad.param, event_id=event_id)
            except LiteASRError as bad:  # an option out of range (VAD settings)
                self._emit_error(str(bad), code="invalid_option", event_id=event_id)

    def _count_event(self) -> None:
        now = time.monotonic()
        self._tokens = min(EVENT_BURST, self._tokens + (now - self._refilled) * EVENTS_PER_SECOND)
        self._refilled = now
        if self._tokens < 1:
            raise _Close(1008, f"more than {EVENTS_PER_SECOND:g} events per second", "flood")
        self._tokens -= 1

    async def _send_loop(self) -> None:
        """The only writer of the socket: events from the receive loop and the turns go out in order."""
        while (event := await self._outbox.get()) is not None:
            try:
                await self.websocket.send_text(json.dumps(event, ensure_ascii=False))
            except Exception:  # the client is gone; the receive loop finds out and ends the session
                return

    def _emit(self, type_: str, **fields: Any) -> None:
        self._outbox.put_nowait({"type": type_, "event_id": "event_" + uuid.uuid4().hex[:20], **fields})

    def _emit_error(
        self,
        message: str,
        *,
        code: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        event_id: object = None,
    ) -> None:
        self._emit(
            "error",
            error={
                "type": type_,
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id if isinstance(event_id, str) else None,
            },
        )

    def _session(self) -> dict[str, Any]:
        return {"id": self.id, **self.config.describe(self.service.model_name)}

    # -- client events --------------------------------------------------------------------------------------

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind in ("session.update", "transcription_session.update"):
            self._update(event.get("session"))
            self._emit("session.updated", session=self._session())
        elif kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            self._commit_all()
        elif kind == "input_audio_buffer.clear":
            self._reset_buffer(drop=len(self._buffer))
            self._emit("input_audio_buffer.cleared")
        else:
            raise _Malformed(f"unknown event type {kind[:80]!r}", code="unknown_event", param="type")

    def _update(self, session: object) -> None:
        """The current shape (`audio.input.{format, transcription, turn_detection}`) or the beta one
        (`input_audio_format`, `input_audio_transcription`, `turn_detection`)."""
        if not isinstance(session, dict):
            raise _Malformed("session.update needs a `session` object", param="session")
        audio = session.get("audio")
        source = audio.get("input", {}) if isinstance(audio, dict) else session
        if not isinstance(source, dict):
            raise _Malformed("session.audio.input must be an object", param="session.audio.input")
        config = self.config
        rate = config.rate
        if "format" in source:
            audio_format = source["format"]
            if not isinstance(audio_format, dict) or audio_format.get("type") not in ("audio/pcm", "pcm16"):
                raise _Malformed("the input format must be {type: audio/pcm, rate}", param="format")
            rate = audio_format.get("rate", 24000)
        elif "input_audio_format" in source and source["input_audio_format"] != "pcm16":
            raise _Malformed("input_audio_format must be pcm16", param="input_audio_format")
        if rate not in RATES:
            raise _Malformed(f"the input rate must be 24000 or 16000 Hz, not {rate}", param="rate")
        transcription = source.get("transcription", source.get("input_audio_transcription"))
        language, prompt = config.language, config.prompt
        if isinstance(transcription, dict):
            language = transcription.get("language") or None
            prompt = transcription.get("prompt") or None
        vad = config.vad
        if "turn_detection" in source:
            vad = _turn_detection(source["turn_detection"])
        options = DecodeOptions(language=language.strip().lower() if language else None, prompt=prompt)
        self.service.check_options(None, options)
        if rate != config.rate and len(self._buffer):
            raise _Malformed("the input rate cannot change while audio is buffered; commit or clear first")
        if rate != config.rate:
            self._resampler = None
        self.config = replace(config, rate=rate, language=options.language, prompt=prompt, vad=vad)

    async def _append(self, audio: object) -> None:
        if not isinstance(audio, str):
            raise _Malformed("input_audio_buffer.append needs `audio`: base64 PCM16", param="audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise _Malformed("`audio` is not valid base64", param="audio") from None
        if len(raw) % 2:
            raise _Malformed("PCM16 audio has an even number of bytes", param="audio")
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if self.config.rate != SAMPLE_RATE:
            if self._resampler is None:
                self._resampler = soxr.ResampleStream(self.config.rate, SAMPLE_RATE, 1, "float32", "HQ")
            samples = self._resampler.resample_chunk(samples)
        limit = int(self.settings.realtime_max_buffer_s * SAMPLE_RATE)
        if len(self._buffer) + len(samples) > limit:
            raise _Malformed(
                f"the buffer holds at most {self.settings.realtime_max_buffer_s:g} s of audio "
                "(LITEASR_REALTIME_MAX_BUFFER_S); commit or clear it",
                code="input_audio_buffer_full",
            )
        self._buffer = np.concatenate([self._buffer, samples])
        if (
            self.config.vad is not None
            and len(self._buffer) - self._scored_until >= VAD_EVERY_SECONDS * SAMPLE_RATE
        ):
            await self._detect_turns()

    # -- turns ----------------------------------------------------------------------------------------------

    async def _detect_turns(self) -> None:
        """Score the new audio for speech; open a turn when speech starts, commit it after the silence."""
        vad = self.config.vad
        assert vad is not None
        context = int(VAD_CONTEXT_SECONDS * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
        first_frame = max(0, self._scored_until - context) // FRAME_SAMPLES
        start = first_frame * FRAME_SAMPLES
        usable = (len(self._buffer) - start) // FRAME_SAMPLES * FRAME_SAMPLES
        if usable <= 0:
            return
        detector = self.service.detector()
        scores = await asyncio.to_thread(detector.probabilities, self._buffer[start : start + usable])
        self._probabilities = np.concatenate(
            [self._probabilities[:first_frame], scores[: usable // FRAME_SAMPLES]]
        )
        self._scored_until = start + usable
        padding = int(vad.prefix_padding_ms * SAMPLE_RATE / 1000)
        silence_frames = max(1, round(vad.silence_duration_ms * SAMPLE_RATE / 1000 / FRAME_SAMPLES))
        speech = self._probabilities >= vad.threshold
        quiet = self._probabilities < max(0.01, vad.threshold - 0.15)
        while True:
            if self._speech_start is None:
                run = _first_run(speech, SPEECH_FRAMES)
                if run is None:  # no speech: keep only what the next turn's padding and context need
                    self._reset_buffer(drop=max(0, self._scored_until - padding - context))
                    return
                onset = self._buffer_start + run * FRAME_SAMPLES
                self._speech_start = max(self._buffer_start, onset - padding)
                self._item = "item_" + uuid.uuid4().hex[:20]
                self._emit(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=_ms(self._speech_start),
                    item_id=self._item,
                )
            begin = (self._speech_start - self._buffer_start) // FRAME_SAMPLES
            end = _silence_after_speech(speech[begin:], quiet[begin:], silence_frames)
            turn_frames = int(MAX_TURN_SECONDS * SAMPLE_RATE) // FRAME_SAMPLES
            if end is None and len(speech) - begin < turn_frames:
                self._maybe_partial()
                return
            if end is None:  # 30 s of speech: commit it as it is and go on in a new turn
                stop = self._speech_start + turn_frames * FRAME_SAMPLES
            else:
                stop = min(self._buffer_start + (begin + end) * FRAME_SAMPLES + padding, self._end())
            # The end of the speech itself; the turn's audio keeps the padding after it.
            speech_end = min(stop, self._buffer_start + (begin + (end or turn_frames)) * FRAME_SAMPLES)
            self._emit("input_audio_buffer.speech_stopped", audio_end_ms=_ms(speech_end), item_id=self._item)
            self._commit(self._speech_start, stop)
            self._reset_buffer(drop=stop - self._buffer_start)
            speech = self._probabilities >= vad.threshold
            quiet = self._probabilities < max(0.01, vad.threshold - 0.15)

    def _maybe_partial(self) -> None:
        """The extension: decode the open turn again about once a second while it is spoken, one at a time."""
        if not self._partials or self._item is None or self._speech_start is None:
            return
        if self._partial is not None and not self._partial.done():
            return
        if self._end() - max(self._partial_at, self._speech_start) < PARTIAL_EVERY_SECONDS * SAMPLE_RATE:
            return
        self._partial_at = self._end()
        audio = self._buffer[self._speech_start - self._buffer_start :].copy()
        self._partial = asyncio.create_task(self._decode_partial(self._item, audio))

    async def _decode_partial(self, item: str, audio: np.ndarray) -> None:
        options = DecodeOptions(language=self.config.language, prompt=self.config.prompt)
        try:
            with self.service.admit() as ticket:
                prepare = functools.partial(self.service.windows, audio, None)
                outcome = await self.service.transcribe_prepared(ticket, prepare, options, gone=self._gone)
        except asyncio.CancelledError:
            raise
        except Exception:  # a full queue: no partial this time, the turn's own transcript still comes
            logger.debug("a partial caption was skipped", exc_info=True)
            return
        if self._item == item:  # still being spoken: once committed, its own deltas and completed follow
            self._emit(PARTIAL_EVENT, item_id=item, content_index=0, transcript=outcome.transcription.text)

    def _commit_all(self) -> None:
        """`input_audio_buffer.commit`: the whole buffer is one turn."""
        if len(self._buffer) < MIN_COMMIT_SECONDS * SAMPLE_RATE:
            raise _Malformed(
                f"buffer too small: at least {MIN_COMMIT_SECONDS * 1000:g} ms of audio is needed to commit",
                code="input_audio_buffer_commit_empty",
            )
        if self._item is None:
            self._item = "item_" + uuid.uuid4().hex[:20]
        start = self._speech_start if self._speech_start is not None else self._buffer_start
        self._commit(start, self._end())
        self._reset_buffer(drop=len(self._buffer))

    def _commit(self, start: int, stop: int) -> None:
        item = self._item or "item_" + uuid.uuid4().hex[:20]
        audio = self._buffer[start - self._buffer_start : stop - self._buffer_start].copy()
        self._emit("input_audio_buffer.committed", item_id=item, previous_item_id=self._previous_item)
        self._previous_item, self._item, self._speech_start = item, None, None
        self._turns.put_nowait((item, audio, time.monotonic()))

    def _end(self) -> int:
        return self._buffer_start + len(self._buffer)

    def _reset_buffer(self, *, drop: int) -> None:
        """Forget the first `drop` samples of the buffer (and their speech scores)."""
        drop = drop // FRAME_SAMPLES * FRAME_SAMPLES if drop < len(self._buffer) else len(self._buffer)
        self._buffer = self._buffer[drop:]
        self._buffer_start += drop
        self._probabilities = self._probabilities[drop // FRAME_SAMPLES :]
        self._scored_until = max(0, self._scored_until - drop)
        if not len(self._buffer):
            self._probabilities, self._scored_until = np.zeros(0, dtype=np.float32), 0
            self._speech_start, self._item = None, None

    async def _turn_loop(self) -> None:
        while (turn := await self._turns.get()) is not None:
            await self._transcribe(*turn)

    async def _transcribe(self, item: str, audio: np.ndarray, ended: float) -> None:
        options = DecodeOptions(language=self.config.language, prompt=self.config.prompt)

        def delta(text: str) -> None:
            self._emit(
                "conversation.item.input_audio_transcription.delta", item_id=item, content_index=0, delta=text
            )

        try:
            with self.service.admit() as ticket:
                prepare = functools.partial(self.service.windows, audio, None)
                outcome = await self.service.transcribe_prepared(
                    ticket, prepare, options, on_text=delta, gone=self._gone
                )
        except asyncio.CancelledError:
            raise
        except (
            Exception
        ) as error:  # queue full, timeout, a failed window: this turn fails, the session goes on
            body, reason = error_event(error)
            if reason is not None:
                self.metrics.requests_rejected.labels(reason).inc()
            self.metrics.realtime_turns.labels("failed").inc()
            self._emit(
                "conversation.item.input_audio_transcription.failed",
                item_id=item,
                content_index=0,
                error=body["error"],
            )
            return
        self.metrics.realtime_turns.labels("completed").inc()
        self.metrics.caption_latency.observe(time.monotonic() - ended)
        self._emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item,
            content_index=0,
            transcript=outcome.transcription.text,
            usage={"type": "duration", "seconds": round(len(audio) / SAMPLE_RATE, 3)},
        )


def _turn_detection(value: object) -> VadOptions | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "server_vad":
        raise _Malformed("turn_detection must be null or {type: server_vad, ...}", param="turn_detection")
    defaults = VadOptions()
    try:
        return VadOptions(
            threshold=float(value.get("threshold", defaults.threshold)),
            prefix_padding_ms=int(value.get("prefix_padding_ms", defaults.prefix_padding_ms)),
            silence_duration_ms=int(value.get("silence_duration_ms", defaults.silence_duration_ms)),
        )
    except (TypeError, ValueError):
        raise _Malformed("turn_detection settings must be numbers", param="turn_detection") from None


def _first_run(flags: np.ndarray, length: int) -> int | None:
    """Index where `length` True values in a row begin first, else None."""
    run = 0
    for index, flag in enumerate(flags):
        run = run + 1 if flag else 0
        if run >= length:
            return index - length + 1
    return None


def _silence_after_speech(speech: np.ndarray, quiet: np.ndarray, frames: int) -> int | None:
    """Frame just after the last speech frame that is followed by `frames` quiet frames, else None."""
    last_speech = -1
    run = 0
    for index in range(len(speech)):
        if speech[index]:
            last_speech, run = index, 0
        elif quiet[index]:
            run += 1
            if run >= frames and last_speech >= 0:
                return last_speech + 1
        else:
            run = 0
    return None


def _ms(sample: int) -> int:
    return int(sample * 1000 / SAMPLE_RATE)
