"""A transcription rendered as json, text, srt, vtt or verbose_json (OpenAI's formats, same names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.schemas import (
    OpenAITranscription,
    SegmentOut,
    Timings,
    TranscriptionOut,
    VerboseTranscription,
    WordOut,
)
from liteasr.decoding import Segment, Transcription

__all__ = [
    "Outcome",
    "done_event",
    "render",
    "segments_out",
    "srt",
    "timestamp",
    "transcription_body",
    "vtt",
    "words_out",
]


@dataclass(frozen=True)
class Outcome:
    """What the service hands a route: the transcript and how it was made."""

    transcription: Transcription
    model: str
    task: str
    timings: Timings


def render(
    outcome: Outcome,
    response_format: str,
    *,
    openai: bool = False,
    segments: bool = False,
    words: bool = False,
) -> Response:
    """The HTTP response for one format; `openai` gives OpenAI's bodies, else the richer /transcribe ones.
    `segments`, `words`: list them in the JSON bodies (verbose_json always lists segments unless only words were
    asked for)."""
    t = outcome.transcription
    if response_format == "text":
        return PlainTextResponse(t.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(segments_out(t)), media_type="application/x-subrip")
    if response_format == "vtt":
        return PlainTextResponse(vtt(segments_out(t)), media_type="text/vtt")
    if response_format == "verbose_json":
        body = VerboseTranscription(
            task=outcome.task,
            language=t.language,
            duration=round(t.duration, 3),
            text=t.text,
            segments=segments_out(t) if segments or not words else None,
            words=words_out(t) if words else None,
        ).model_dump(exclude_none=True)
        if not openai:
            body.update(model=outcome.model, windows=t.windows, timings=outcome.timings.model_dump())
        return JSONResponse(body)
    if openai:
        return JSONResponse(OpenAITranscription(text=t.text).model_dump())
    return JSONResponse(transcription_body(outcome, segments=segments, words=words))


def transcription_body(outcome: Outcome, *, segments: bool, words: bool) -> dict[str, Any]:
    """The JSON body of `POST /transcribe`."""
    t = outcome.transcription
    return TranscriptionOut(
        text=t.text,
        language=t.language,
        duration=round(t.duration, 3),
        model=outcome.model,
        windows=t.windows,
        segments=segments_out(t) if segments or words else None,
        words=words_out(t) if words else None,
        timings=outcome.timings,
    ).model_dump(exclude_none=True)


def done_event(
    outcome: Outcome, *, openai: bool, segments: bool = False, words: bool = False
) -> dict[str, Any]:
    """The last event of a stream: OpenAI's `transcript.text.done`; on /transcribe (`openai=False`) it also
    carries the whole JSON answer (language, duration, timings, and segments or words when asked for)."""
    t = outcome.transcription
    event: dict[str, Any] = {
        "type": "transcript.text.done",
        "text": t.text,
        "usage": {"type": "duration", "seconds": round(t.duration, 3)},
    }
    if not openai:
        event.update(transcription_body(outcome, segments=segments, words=words), type=event["type"])
    return event


def words_out(t: Transcription) -> list[WordOut]:
    """The words of a transcript, their times clipped to the audio."""
    end_of_audio = t.duration if t.duration > 0 else float("inf")
    out = []
    for w in t.words:
        start = round(min(max(0.0, w.start), end_of_audio), 3)
        end = round(min(max(w.end, w.start), end_of_audio), 3)
        out.append(
            WordOut(word=w.text, start=start, end=max(end, start), probability=round(w.probability, 4))
        )
    return out


def segments_out(t: Transcription) -> list[SegmentOut]:
    """The segments of a transcript; one spanning the audio when the decoder gave text but no timestamps."""
    segments: tuple[Segment, ...] = t.segments
    if not segments and t.text:
        segments = (Segment(0.0, t.duration, t.text),)
    out = []
    for index, s in enumerate(segments):
        start = round(max(0.0, s.start), 3)
        end = round(min(max(s.end, s.start), t.duration if t.duration > 0 else s.end), 3)
        out.append(
            SegmentOut(
                id=index,
                seek=int(start * 100),
                start=start,
                end=max(end, start),
                text=s.text,
                tokens=list(s.tokens),
                temperature=s.temperature,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
            )
        )
    return out


def timestamp(seconds: float, separator: str) -> str:
    """`HH:MM:SS<sep>mmm`: separator `,` for SRT, `.` for WebVTT."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[SegmentOut]) -> str:
    blocks = [
        f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def vtt(segments: list[SegmentOut]) -> str:
    blocks = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)
