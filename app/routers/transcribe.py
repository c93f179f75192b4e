"""`POST /transcribe`: the service's own API (JSON with timings, or text, srt, vtt, verbose_json)."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import ServiceDep
from app.formats import done_event, render
from app.schemas import TranscribeForm, TranscriptionOut, multipart_body, transcription_responses
from app.uploads import check_content_length

router = APIRouter(tags=["transcription"])


@router.post(
    "/transcribe",
    summary="Transcribe (or translate) an audio file",
    openapi_extra=multipart_body(TranscribeForm),
    responses=transcription_responses(TranscriptionOut),
)
async def transcribe(request: Request, service: ServiceDep) -> Response:
    check_content_length(request, service.settings.max_upload_bytes)
    with service.admit() as ticket:  # before a byte of the upload is read
        upload = await service.read_upload(ticket, request)
        form = TranscribeForm.parse(upload)
        options = form.decode_options()
        service.check_options(ticket, options)
        vad = service.vad_options(form.chunking())
        listed = {"segments": options.timestamps, "words": options.words}
        if form.stream:
            done = partial(done_event, openai=False, **listed)
            return await service.stream(ticket, request, upload.audio, options, done=done, vad=vad)
        outcome = await service.transcribe(ticket, request, upload.audio, options, vad=vad)
    return render(outcome, form.response_format, **listed)
