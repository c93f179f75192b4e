"""Response rendering (json, text, srt, vtt, verbose_json), request forms, settings and app assembly, no model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from app.config import Settings
from app.errors import UnsupportedParameter
from app.formats import Outcome, done_event, render, segments_out, srt, timestamp, vtt
from app.main import create_app
from app.schemas import OpenAIForm, Timings, TranscribeForm
from app.uploads import Upload
from liteasr.decoding import Segment, Transcription, Word

TIMINGS = Timings(queue_wait_s=0.01, inference_s=0.5, batch_size=2, decode_s=0.001, total_s=0.6)
TRANSCRIPTION = Transcription(
    text="Hello there. General Kenobi.",
    language="en",
    duration=65.5,
    segments=(Segment(0.0, 2.5, " Hello there.", (1, 2)), Segment(61.25, 3723.0, "General Kenobi.", (3,))),
    windows=3,
)
OUTCOME = Outcome(TRANSCRIPTION, "whisper-tiny.en", "transcribe", TIMINGS)


def test_timestamps():
    assert timestamp(0.0, ",") == "00:00:00,000"
    assert timestamp(61.25, ",") == "00:01:01,250"
    assert timestamp(3723.4567, ".") == "01:02:03.457"
    assert timestamp(-1.0, ".") == "00:00:00.000"


def test_srt_and_vtt():
    segments = segments_out(TRANSCRIPTION)
    assert segments[1].end == 65.5  # clamped to the audio's duration
    assert srt(segments) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n2\n00:01:01,250 --> 00:01:05,500\nGeneral Kenobi.\n"
    )
    assert vtt(segments) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n00:01:01.250 --> 00:01:05.500\nGeneral Kenobi.\n"
    )
    assert srt([]) == "" and vtt([]) == "WEBVTT\n\n"


def test_text_without_timestamps_becomes_one_segment():
    segments = segments_out(Transcription(text="Hi.", language="en", duration=1.5))
    assert [(s.start, s.end, s.text) for s in segments] == [(0.0, 1.5, "Hi.")]
    assert segments_out(Transcription(text="", language="en", duration=1.5)) == []


def test_render_bodies():
    body = json.loads(render(OUTCOME, "json").body)
    assert body["text"] == TRANSCRIPTION.text and body["model"] == "whisper-tiny.en" and body["windows"] == 3
    assert body["timings"]["batch_size"] == 2 and "segments" not in body
    assert len(json.loads(render(OUTCOME, "json", segments=True).body)["segments"]) == 2
    assert json.loads(render(OUTCOME, "json", openai=True).body) == {"text": TRANSCRIPTION.text}

    verbose = json.loads(render(OUTCOME, "verbose_json", openai=True).body)
    assert set(verbose) == {"task", "language", "duration", "text", "segments"}
    assert verbose["segments"][1]["seek"] == 6125
    assert {"model", "timings", "windows"} <= set(json.loads(render(OUTCOME, "verbose_json").body))

    text = render(OUTCOME, "text")
    assert text.body.decode() == TRANSCRIPTION.text + "\n" and text.media_type == "text/plain"
    assert render(OUTCOME, "vtt").media_type == "text/vtt"
    assert render(OUTCOME, "srt").body.decode().startswith("1\n00:00:00,000")


def test_transcribe_form():
    form = TranscribeForm.parse(Upload(fields={"language": [" EN "], "response_format": ["srt"]}))
    assert form.language == "en" and form.response_format == "srt"
    assert form.decode_options().timestamps  # srt needs segment times
    plain = TranscribeForm.parse(Upload(fields={"language": [""], "timestamps": ["false"]}))
    assert plain.language is None and not plain.decode_options().timestamps
    assert TranscribeForm.parse(Upload(fields={"timestamps": ["true"]})).decode_options().timestamps
    with pytest.raises(RequestValidationError) as invalid:
        TranscribeForm.parse(Upload(fields={"response_format": ["xml"], "task": ["sing"]}))
    assert {e["loc"] for e in invalid.value.errors()} == {("body", "response_format"), ("body", "task")}


def test_openai_form():
    upload = Upload(
        fields={
            "model": ["whisper-1"],
            "timestamp_granularities[]": ["segment", "word"],
            "temperature": ["0.2"],
            "prompt": ["Kenobi"],
        }
    )
    form = OpenAIForm.parse(upload)
    assert form.timestamp_granularities == ["segment", "word"] and form.temperature == 0.2
    with pytest.raises(RequestValidationError):
        OpenAIForm.parse(Upload(fields={"temperature": ["3"]}))
    # Words need verbose_json (OpenAI's rule); then prompt, temperature and words reach the decoder.
    with pytest.raises(UnsupportedParameter, match="verbose_json"):
        form.decode_options("transcribe")
    verbose = OpenAIForm.parse(Upload(fields={**upload.fields, "response_format": ["verbose_json"]}))
    options = verbose.decode_options("transcribe")
    assert options.words and options.timestamps and options.prompt == "Kenobi" and options.temperature == 0.2
    assert verbose.segments and verbose.words
    only_words = OpenAIForm.parse(Upload(fields={"timestamp_granularities[]": ["word"]}))
    assert only_words.words and not only_words.segments
    # A stream answers with events: formats that are documents of their own cannot be streamed.
    for response_format, allowed in [("json", True), ("text", True), ("srt", False), ("verbose_json", False)]:
        streamed = OpenAIForm.parse(Upload(fields={"stream": ["true"], "response_format": [response_format]}))
        if allowed:
            assert streamed.decode_options("transcribe") and streamed.stream
        else:
            with pytest.raises(UnsupportedParameter, match="stream"):
                streamed.decode_options("transcribe")


def test_transcribe_form_word_timestamps_and_stream():
    assert TranscribeForm.parse(Upload(fields={"timestamps": ["segment"]})).decode_options().timestamps
    options = TranscribeForm.parse(
        Upload(fields={"timestamps": ["word"], "stream": ["true"], "prompt": ["Zyx"]})
    ).decode_options()
    assert options.words and options.timestamps and options.prompt == "Zyx"
    with pytest.raises(UnsupportedParameter, match="timestamps=word"):
        TranscribeForm.parse(
            Upload(fields={"timestamps": ["word"], "response_format": ["text"]})
        ).decode_options()
    with pytest.raises(RequestValidationError):
        TranscribeForm.parse(Upload(fields={"timestamps": ["letters"]}))


def test_words_and_the_done_event():
    words = (Word(0.2, 0.5, " Hello,", 0.9), Word(0.5, 99.0, " world.", 0.8))
    outcome = replace(OUTCOME, transcription=replace(TRANSCRIPTION, words=words))
    verbose = json.loads(render(outcome, "verbose_json", openai=True, words=True).body)
    assert "segments" not in verbose  # only words were asked for
    assert verbose["words"][0] == {"word": " Hello,", "start": 0.2, "end": 0.5, "probability": 0.9}
    assert verbose["words"][1]["end"] == TRANSCRIPTION.duration  # clipped to the audio
    both = json.loads(render(outcome, "verbose_json", openai=True, segments=True, words=True).body)
    assert {"segments", "words"} <= set(both)
    assert "words" in json.loads(render(outcome, "json", words=True).body)

    done = done_event(outcome, openai=True)
    assert done == {
        "type": "transcript.text.done",
        "text": TRANSCRIPTION.text,
        "usage": {"type": "duration", "seconds": round(TRANSCRIPTION.duration, 3)},
    }
    rich = done_event(outcome, openai=False, words=True)
    assert rich["type"] == "transcript.text.done" and rich["words"] and rich["timings"] and rich["language"]


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("LITEASR_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("LITEASR_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("LITEASR_ADMIN_TOKEN", "")
    monkeypatch.setenv("LITEASR_MODEL", "models/whisper-tiny.en/")
    settings = Settings()
    assert settings.max_batch_size == 16
    assert settings.cors_origins == ["http://a.example", "http://b.example"]
    assert settings.admin_token is None
    assert settings.model_name == "whisper-tiny.en"
    assert settings.max_upload_bytes == 25 * 2**20
    monkeypatch.setenv("LITEASR_DEVICE", "tpu")
    with pytest.raises(ValueError):
        Settings()
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undocumented == []


def test_app_assembly_without_a_model():
    """No lifespan here (no model): CORS, the documented multipart body, and 404/503 in the error shape."""
    app = create_app(Settings(cors_origins=["http://ui.example"]))
    client = TestClient(app)
    preflight = client.options(
        "/v1/audio/transcriptions",
        headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://ui.example"

    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/transcribe"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert {"language", "task", "response_format", "timestamps"} <= set(body["properties"])
    openai_body = schema["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert "timestamp_granularities[]" in openai_body["multipart/form-data"]["schema"]["properties"]

    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"message": "no route GET /nope", "type": "invalid_request_error", "code": "not_found"}
    }
    assert (
        "access-control-allow-origin"
        not in TestClient(create_app(Settings()))
        .options(
            "/transcribe", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
        )
        .headers
    )
