"""OpenAI's audio API: `POST /v1/audio/transcriptions`, `POST /v1/audio/translations`, `GET /v1/models`.

`model` is accepted and ignored (one model is served at a time). `stream=true` answers with Server-Sent Events
(`app.streaming`); `timestamp_granularities[]=word` adds word times to verbose_json.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import ServiceDep
from app.errors import ModelNotFound
from app.formats import done_event, render
from app.schemas import (
    ModelCard,
    ModelList,
    OpenAIForm,
    OpenAITranscription,
    multipart_body,
    transcription_responses,
)
from app.uploads import check_content_length

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/audio/transcriptions",
    summary="OpenAI-compatible transcription",
    openapi_extra=multipart_body(OpenAIForm),
    responses=transcription_responses(OpenAITranscription),
)
async def transcriptions(request: Request, service: ServiceDep) -> Response:
    return await _handle(request, service, "transcribe")


@router.post(
    "/audio/translations",
    summary="OpenAI-compatible translation to English",
    openapi_extra=multipart_body(OpenAIForm),
    responses=transcription_responses(OpenAITranscription),
)
async def translations(request: Request, service: ServiceDep) -> Response:
    return await _handle(request, service, "translate")


@router.get(
    "/models", summary="The served model and the others in LITEASR_MODELS_DIR", response_model=ModelList
)
async def list_models(service: ServiceDep) -> ModelList:
    """The served model first (`active: true`), then the models an admin can activate."""
    return ModelList(data=[_card(*model) for model in service.models()])


@router.get("/models/{model_id}", summary="One model", response_model=ModelCard)
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    for model in service.models():
        if model[0] == model_id:
            return _card(*model)
    raise ModelNotFound(f"no model {model_id!r}; this server serves {service.model_name!r}")


def _card(name: str, created: int, active: bool) -> ModelCard:
    return ModelCard(id=name, created=created, active=active)


async def _handle(
    request: Request, service: ServiceDep, task: Literal["transcribe", "translate"]
) -> Response:
    check_content_length(request, service.settings.max_upload_bytes)
    with service.admit() as ticket:  # before a byte of the upload is read
        upload = await service.read_upload(ticket, request)
        form = OpenAIForm.parse(upload)
        options = form.decode_options(task)
        service.check_options(ticket, options)
        vad = service.vad_options(form.chunking())
        if form.stream:
            return await service.stream(
                ticket, request, upload.audio, options, done=partial(done_event, openai=True), vad=vad
            )
        outcome = await service.transcribe(ticket, request, upload.audio, options, vad=vad)
    return render(outcome, form.response_format, openai=True, segments=form.segments, words=form.words)
