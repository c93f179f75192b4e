"""`stream=true`: a transcript as Server-Sent Events, in OpenAI's shape, token by token.

    data: {"type": "transcript.text.delta", "delta": " And so"}
    data: {"type": "transcript.text.done", "text": "And so my fellow ...", "usage": {"type": "duration", ...}}

The deltas come from the step engine's token stream (`Batcher.submit(on_token=...)`). `TextDeltas` turns the
tokens of a request's windows into text in order: the windows of a long file decode side by side, but their text
streams window by window, a later window's text held until the windows before it are done. Their concatenation is
the `done` event's text, which is always the non-streamed transcript. One exception, counted by
`liteasr_stream_revisions_total`: a window whose first attempt was streamed and then judged degenerate is decoded
again (the loop guard's fallback); what was sent cannot be taken back, so the rest of that window is not streamed
and only the `done` event has its final text. A trailing repetition is held back while it grows, so a loop never
streams its repeats.

Errors before the first event keep their status and error shape: the response starts only once the first delta
is decoded (or the transcription ended without text). Errors after it arrive as one `error` event in the error
shape (the `openai` client raises it as an `APIError`).

Starlette's own `StreamingResponse` is enough for this stream: the events are bare `data:` lines (no ids, no
retry: a transcription is never resumed), and it cancels the event generator when the client disconnects, which
cancels the request's job and frees its decoder rows at the next step. sse-starlette adds reconnection fields we
have no use for and closes open streams on the server's exit signal, where ours must run to their end within the
shutdown grace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi.responses import StreamingResponse

from app.errors import error_event
from app.formats import Outcome
from app.metrics import Metrics
from liteasr.decoding import TokenEvent, find_repetition

__all__ = ["TextDeltas", "stream_transcription"]

KEEPALIVE_S = 15.0  # an SSE comment this often while nothing decodes, so idle proxies keep the connection
REPEATS_HELD = 2  # a trailing n-gram repeated this often is held back until text that is not a repeat follows


class TextDeltas:
    """The text of a request's windows as it decodes, in window order, handed to `emit` piece by piece."""

    def __init__(
        self, text: Callable[[Sequence[int]], str], windows: int, emit: Callable[[str], None]
    ) -> None:
        self._text = text
        self._emit = emit
        self._tokens: list[list[int]] = [[] for _ in range(windows)]
        self._attempt = [0] * windows
        self._final: list[str | None] = [None] * windows
        self._sent = [""] * windows  # the window's text streamed so far (without its leading separator)
        self._current = 0  # the window whose text streams now; every window before it is done
        self._anything_sent = False
        self.revised = 0  # windows whose streamed text turned out not to begin their final text

    def token(self, index: int, event: TokenEvent) -> None:
        if event.attempt != self._attempt[index]:  # a fallback: the earlier attempt's tokens are void
            self._attempt[index], self._tokens[index] = event.attempt, []
        self._tokens[index].append(event.token)
        if index == self._current:
            self._flush()

    def window_done(self, index: int, text: str) -> None:
        self._final[index] = text
        if index == self._current:
            self._flush()

    def _flush(self) -> None:
        while self._current < len(self._final):
            index = self._current
            final = self._final[index]
            if final is None and self._attempt[index] == 0:
                self._send(index, self._provisional(index))
                return
            if final is None:  # decoding again after a fallback: its text comes with its result
                return
            if final.startswith(self._sent[index]):
                self._send(index, final)
            else:
                self.revised += 1
            self._current += 1

    def _provisional(self, index: int) -> str:
        """The window's text so far, less what may still change: a repetition that may be a loop, a character
        whose bytes are not all decoded, trailing spaces (a window's final text is stripped)."""
        tokens = self._tokens[index]
        repeat = find_repetition(tokens, REPEATS_HELD)
        text = self._text(tokens[:repeat] if repeat is not None else tokens)
        return text.rstrip("\ufffd").strip()

    def _send(self, index: int, text: str) -> None:
        sent = self._sent[index]
        if len(text) <= len(sent) or not text.startswith(sent):
            return
        piece = text[len(sent) :]
        if not sent and self._anything_sent:
            piece = " " + piece  # windows join with one space, as in the whole transcript
        self._sent[index] = text
        self._anything_sent = True
        self._emit(piece)


async def stream_transcription(
    transcribe: Callable[[Callable[[str], None]], asyncio.Future[Outcome]],
    done: Callable[[Outcome], dict[str, Any]],
    metrics: Metrics,
) -> StreamingResponse:
    """The SSE response of one transcription. `transcribe(on_text)` starts it (a task that releases its ticket
    when it ends); `done(outcome)` is the body of the final event."""
    deltas: asyncio.Queue[str] = asyncio.Queue()
    work = transcribe(deltas.put_nowait)
    first = asyncio.ensure_future(deltas.get())
    try:
        await asyncio.wait({first, work}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        first.cancel()
        work.cancel()
        raise
    if not first.done():
        first.cancel()
        first = None
        work.result()  # an error before the first event: raised here, answered with its own status
    return StreamingResponse(
        _events(first, deltas, work, done, metrics),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    pending: asyncio.Future[str] | None,
    deltas: asyncio.Queue[str],
    work: asyncio.Future[Outcome],
    done: Callable[[Outcome], dict[str, Any]],
    metrics: Metrics,
) -> AsyncIterator[str]:
    try:
        while True:
            if pending is None and not work.done():
                pending = asyncio.ensure_future(deltas.get())
            if pending is not None:
                finished, _ = await asyncio.wait(
                    {pending, work}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
                if pending in finished:
                    yield _event({"type": "transcript.text.delta", "delta": pending.result()})
                    pending = None
                    continue
                if not finished:
                    yield ": keep-alive\n\n"
                    continue
                pending.cancel()
                pending = None
            while not deltas.empty():
                yield _event({"type": "transcript.text.delta", "delta": deltas.get_nowait()})
            error = work.exception()
            if error is None:
                yield _event(done(work.result()))
            else:
                body, reason = error_event(error)
                if reason is not None:
                    metrics.requests_rejected.labels(reason).inc()
                yield _event({"type": "error", **body})
            return
    finally:  # the client left (or the server stops): cancelling the work cancels its job
        if pending is not None:
            pending.cancel()
        if not work.done():
            work.cancel()


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
