"""Reliability and security of the service over real HTTP (`python -m app`, Whisper tiny.en on loopback).

- A catalogue of bad input, one row per kind: each gets its 4xx in the service's error shape with a clear message,
  never a 5xx, never a stack trace or a server path; then a good request still transcribes correctly.
- Odd but valid audio: 200 or a 4xx, never a 5xx.
- Limits enforced while streaming: an oversized chunked upload is refused before it is read (the server answers
  while the client is still sending, and its memory does not grow by the upload's size); a client that leaves
  mid-upload frees its place.
- Overload: 300 requests at concurrency 64 against MAX_QUEUE=16: 200 with the right text or 503 with Retry-After,
  gauges back to zero, memory back near where it was.

docs/reliability.md lists the catalogue with its answers and the figures of the longer runs (bench/soak.py,
bench/fuzz_uploads.py).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import re
import socket
import time
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import soundfile as sf
from helpers import JFK, assert_error_shape, handmade_wav, scrape, value, wait_until, words
from server import RunningServer, serve

pytestmark = pytest.mark.real

JFK_WORDS = words(JFK)
SHORT_CLIP = "alsa_Front_Right"  # 1.5 s, "Front, right."
SHORT_TEXT = "front right"
MAX_UPLOAD_MB = 1
MAX_AUDIO_SECONDS = 20


# -- helpers ------------------------------------------------------------------------------------------------


def encode(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def sine(seconds: float, rate: int = 16000, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def float_wav_with(bad: float) -> bytes:
    signal = sine(1.0)
    signal[1234] = bad
    return encode(signal, subtype="FLOAT")


def header_only_wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
    return buffer.getvalue()


def flac_claiming(seconds: float) -> bytes:
    """A real 2 s FLAC whose STREAMINFO says it holds `seconds` of audio (the 36-bit total-samples field)."""
    data = bytearray(encode(sine(2.0), fmt="FLAC"))
    offset = 8 + 10
    packed = int.from_bytes(data[offset : offset + 8], "big")
    packed = (packed & ~(2**36 - 1)) | round(seconds * 16000)
    data[offset : offset + 8] = packed.to_bytes(8, "big")
    return bytes(data)


def corrupt_flac() -> bytes:
    data = bytearray(encode(sine(2.0), fmt="FLAC"))
    data[len(data) // 3 : len(data) // 3 + 300] = np.random.default_rng(5).bytes(300)
    return bytes(data)


def multipart(
    parts: list[tuple[bytes, bytes]], boundary: bytes = b"liteasr-boundary", close: bool = True
) -> bytes:
    """A multipart body from (part headers, part body) pairs, written by hand so that it can be wrong."""
    body = b"".join(
        b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts
    )
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def file_part(audio: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="file"; filename="a.wav"' + extra, audio


def raw(body: bytes, content_type: str | None = "multipart/form-data; boundary=liteasr-boundary") -> dict:
    return {"content": body, "headers": {"content-type": content_type} if content_type else {}}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc/<pid>/status (VmRSS, kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# -- servers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_en_dir, tmp_path_factory) -> RunningServer:
    work = tmp_path_factory.mktemp("reliability")
    settings = {
        "LITEASR_MODEL": str(tiny_en_dir),
        "LITEASR_CACHE_DIR": str(work / "cache"),
        "LITEASR_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "LITEASR_MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
    }
    with serve(settings, work / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def jfk_flac(clip_path) -> bytes:
    return clip_path("jfk").read_bytes()


@pytest.fixture(scope="module")
def short_wav(clip_path) -> bytes:
    audio, rate = sf.read(clip_path(SHORT_CLIP), dtype="float32")
    return encode(audio, rate, subtype="PCM_16")


# -- the catalogue of bad input -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One kind of bad request: how to send it, and the answer it must get."""

    id: str
    # The keyword arguments of client.request (files, data, content, headers, ...).
    request: Callable[[], dict]
    status: int
    code: str
    message: str = ""  # a regular expression the error message must match
    path: str = "/transcribe"
    method: str = "POST"


def upload(data: bytes, name: str = "file", filename: str = "a.wav", **fields: str) -> Callable[[], dict]:
    return lambda: {"files": {name: (filename, data, "application/octet-stream")}, "data": fields or None}


def audio(**fields: str) -> Callable[[], dict]:
    """A valid 1 s WAV with these form fields, for the rows whose fault is a field."""
    return upload(encode(sine(1.0)), **fields)


NOT_AUDIO = "not audio in a format we can read"
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20

CATALOGUE = [
    # the file is not usable audio
    Bad("empty-file", upload(b""), 415, "unsupported_audio", "empty"),
    Bad("text", upload(b"This is a plain text file, not audio.\n" * 20), 415, "unsupported_audio", NOT_AUDIO),
    Bad(
        "png",
        upload(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).bytes(500)),
        415,
        "unsupported_audio",
        NOT_AUDIO,
    ),
    Bad("gzip", upload(gzip.compress(b"some text " * 100)), 415, "unsupported_audio", NOT_AUDIO),
    Bad("random-bytes", upload(np.random.default_rng(3).bytes(10_000)), 415, "unsupported_audio", NOT_AUDIO),
    Bad("json-as-file", upload(b'{"audio": "jfk.flac"}'), 415, "unsupported_audio", NOT_AUDIO),
    Bad(
        "mp3-sync-then-garbage",
        upload(b"\xff\xfb\x90\x44" + np.random.default_rng(4).bytes(5000)),
        415,
        "unsupported_audio",
        NOT_AUDIO,
    ),
    Bad("riff-only", upload(b"RIFF\x10\x00\x00\x00WAVEfmt garbage"), 415, "unsupported_audio"),
    Bad(
        "riff-sizes-lie-no-data",
        upload(b"RIFF\xff\xff\xff\xffWAVEfmt \xff\xff\xff\xff\x01\x00"),
        415,
        "unsupported_audio",
    ),
    Bad("wav-cut-in-header", upload(handmade_wav(b"\x00" * 100)[:30]), 415, "unsupported_audio", "malformed"),
    Bad(
        "zero-channels",
        upload(handmade_wav(channels=0)),
        415,
        "unsupported_audio",
        "[Cc]hannel count is zero",
    ),
    Bad(
        "zero-bits-per-sample",
        upload(handmade_wav(bits=0)),
        415,
        "unsupported_audio",
        "malformed or unsupported",
    ),
    Bad("unknown-wav-codec", upload(handmade_wav(tag=0x1234)), 415, "unsupported_audio"),
    Bad("sample-rate-0", upload(handmade_wav(rate=0)), 415, "unsupported_audio", "no sample rate"),
    Bad(
        "sample-rate-999",
        upload(handmade_wav(rate=999)),
        415,
        "unsupported_audio",
        "unsupported sample rate 999 Hz",
    ),
    Bad(
        "sample-rate-2**31",
        upload(handmade_wav(rate=2**31 - 1)),
        415,
        "unsupported_audio",
        "unsupported sample rate",
    ),
    Bad("nan-samples", upload(float_wav_with(np.nan)), 415, "unsupported_audio", "NaN or infinite"),
    Bad("inf-samples", upload(float_wav_with(np.inf)), 415, "unsupported_audio", "NaN or infinite"),
    Bad("minus-inf-samples", upload(float_wav_with(-np.inf)), 415, "unsupported_audio", "NaN or infinite"),
    Bad("corrupt-flac-body", upload(corrupt_flac()), 415, "unsupported_audio", "corrupt or truncated"),
    # limits
    Bad(
        "audio-over-max-seconds",
        upload(encode(np.zeros(8000 * (MAX_AUDIO_SECONDS + 10)), 8000, subtype="PCM_U8")),
        413,
        "audio_too_long",
        rf"30\.0 s long; the limit is {MAX_AUDIO_SECONDS} s",
    ),
    Bad(
        "flac-header-claims-10-hours", upload(flac_claiming(36000)), 413, "audio_too_long", r"36000\.0 s long"
    ),
    Bad(
        "upload-over-max-mb",
        upload(b"\0" * (MAX_UPLOAD_BYTES + 100_000)),
        413,
        "upload_too_large",
        "LITEASR_MAX_UPLOAD_MB",
    ),
    # the form
    Bad("no-file-part", lambda: {"files": {"language": (None, "en")}}, 400, "missing_file", "no `file` part"),
    Bad(
        "file-under-another-name",
        upload(encode(sine(1.0)), name="audio"),
        400,
        "missing_file",
        "no `file` part",
    ),
    Bad(
        "two-file-parts",
        lambda: raw(multipart([file_part(encode(sine(1.0)))] * 2)),
        400,
        "invalid_upload",
        "more than one `file` part",
    ),
    Bad("unknown-language", audio(language="klingon"), 400, "invalid_option", "klingon"),
    Bad("language-not-english-on-en-model", audio(language="de"), 400, "invalid_option", "English-only"),
    Bad("translate-on-en-model", audio(task="translate"), 400, "invalid_option"),
    Bad("bad-task", audio(task="summarize"), 422, "validation_error", "task"),
    Bad("bad-response-format", audio(response_format="xml"), 422, "validation_error", "response_format"),
    Bad("bad-timestamps-flag", audio(timestamps="maybe"), 422, "validation_error", "timestamps"),
    Bad("field-over-16-kib", audio(language="e" * 20_000), 400, "invalid_upload", "longer than 16 KiB"),
    Bad(
        "too-many-parts",
        lambda: raw(multipart([(b'Content-Disposition: form-data; name="x"', b"1")] * 70)),
        400,
        "invalid_upload",
        "more than 64 parts",
    ),
    # malformed multipart
    Bad(
        "huge-part-headers",
        lambda: raw(multipart([file_part(encode(sine(1.0)), b"\r\nX-Padding: " + b"a" * 200_000)])),
        400,
        "invalid_upload",
        "header",
    ),
    Bad(
        "many-long-part-headers",
        lambda: raw(
            multipart(
                [file_part(encode(sine(1.0)), b"".join(b"\r\nX-%d: " % i + b"a" * 4000 for i in range(5)))]
            )
        ),
        400,
        "invalid_upload",
        "headers of a form part are longer than 16 KiB",
    ),
    Bad(
        "too-many-part-headers",
        lambda: raw(
            multipart([file_part(encode(sine(1.0)), b"".join(b"\r\nX-%d: a" % i for i in range(40)))])
        ),
        400,
        "invalid_upload",
        "too many header lines",
    ),
    Bad(
        "huge-filename",
        upload(encode(sine(1.0)), filename="a" * 100_000 + ".wav"),
        400,
        "invalid_upload",
        "header",
    ),
    Bad(
        "boundary-mismatch",
        lambda: raw(multipart([file_part(encode(sine(1.0)))], boundary=b"other")),
        400,
        "invalid_upload",
    ),
    Bad(
        "no-closing-boundary",
        lambda: raw(multipart([file_part(encode(sine(1.0)))], close=False)),
        400,
        "invalid_upload",
        "closing boundary",
    ),
    Bad(
        "no-boundary-parameter",
        lambda: raw(multipart([file_part(b"x")]), "multipart/form-data"),
        400,
        "invalid_upload",
        "no boundary",
    ),
    Bad(
        "missing-content-disposition",
        lambda: raw(multipart([(b"Content-Type: audio/wav", encode(sine(1.0)))])),
        400,
        "invalid_upload",
        "Content-Disposition",
    ),
    Bad("garbage-body", lambda: raw(np.random.default_rng(7).bytes(3000)), 400, "invalid_upload"),
    # not a multipart body at all
    Bad(
        "json-body",
        lambda: {"json": {"file": "jfk.flac"}},
        415,
        "unsupported_media_type",
        "multipart/form-data",
    ),
    Bad("urlencoded-body", lambda: {"data": {"file": "jfk.flac"}}, 415, "unsupported_media_type"),
    Bad("text-body", lambda: raw(b"hello", "text/plain"), 415, "unsupported_media_type"),
    Bad("no-content-type", lambda: raw(b"hello", None), 415, "unsupported_media_type"),
    # the OpenAI routes' own options
    Bad(
        "openai-word-timestamps",
        audio(**{"timestamp_granularities[]": "word"}),
        400,
        "unsupported_parameter",
        path="/v1/audio/transcriptions",
    ),
    Bad(
        "openai-stream-as-srt",
        audio(stream="true", response_format="srt"),
        400,
        "unsupported_parameter",
        "stream",
        path="/v1/audio/transcriptions",
    ),
    Bad(
        "unknown-chunking-strategy",
        audio(chunking_strategy="by-the-minute"),
        400,
        "unsupported_parameter",
        "chunking_strategy",
    ),
    Bad(
        "openai-temperature-out-of-range",
        audio(temperature="7"),
        422,
        "validation_error",
        "temperature",
        path="/v1/audio/transcriptions",
    ),
    Bad(
        "openai-no-file",
        lambda: {"files": {"model": (None, "whisper-1")}},
        400,
        "missing_file",
        path="/v1/audio/transcriptions",
    ),
    # routes and methods
    Bad("unknown-route", lambda: {}, 404, "not_found", path="/no/such/route", method="GET"),
    Bad("unknown-model", lambda: {}, 404, "model_not_found", path="/v1/models/whisper-large", method="GET"),
    Bad("wrong-method", lambda: {}, 405, "method_not_allowed", method="DELETE"),
    Bad("get-transcribe", lambda: {}, 405, "method_not_allowed", method="GET"),
]


# The label of liteasr_requests_rejected_total each error code counts under.
REJECT_REASON = {
    "unsupported_audio": "bad_audio",
    "audio_too_long": "too_long",
    "upload_too_large": "too_large",
    "invalid_option": "bad_option",
    "unsupported_parameter": "bad_option",
    "missing_file": "invalid_request",
    "invalid_upload": "invalid_request",
    "unsupported_media_type": "invalid_request",
    "validation_error": "invalid_request",
}


def test_the_catalogue_is_complete():
    assert len({bad.id for bad in CATALOGUE}) == len(CATALOGUE) >= 25


@pytest.mark.parametrize("bad", CATALOGUE, ids=[bad.id for bad in CATALOGUE])
def test_bad_input_gets_a_clean_4xx(client, bad):
    response = client.request(bad.method, bad.path, **bad.request())
    error = assert_error_shape(response, bad.status, bad.code)
    assert re.search(bad.message, error["message"]), error["message"]


# -- odd but valid: 200 or 4xx, never 5xx -------------------------------------------------------------------


def loud_float(seconds: float = 0.5) -> bytes:
    peak = np.finfo(np.float32).max
    return encode(
        np.tile(np.repeat([peak, -peak, 0.5, -3.0], 200), round(seconds * 20)), 8000, subtype="FLOAT"
    )


ODD_BUT_VALID = {
    "header-only-wav": header_only_wav,
    "zero-samples": lambda: handmade_wav(b""),
    "data-size-zero-with-samples": lambda: handmade_wav(b"\x10\x00" * 1000, data_size=0),
    "digital-silence": lambda: encode(np.zeros(16000, dtype=np.int16), subtype="PCM_16"),
    "ten-ms": lambda: encode(sine(0.01)),
    "one-sample": lambda: encode(np.array([0.5], dtype=np.float32), subtype="FLOAT"),
    "rate-1-hz": lambda: handmade_wav(b"\x00\x10" * 4, rate=1),
    "rate-1000-hz": lambda: encode(sine(1.0, 1000, 100.0), 1000),
    "rate-384-khz": lambda: encode(sine(0.5, 384000), 384000),
    "rate-768-khz": lambda: encode(sine(0.25, 768000), 768000),
    "eight-channels": lambda: encode(np.tile(sine(1.0)[:, None], (1, 8)), subtype="PCM_16"),
    "eight-channels-wavex": lambda: encode(
        np.tile(sine(1.0)[:, None], (1, 8)), fmt="WAVEX", subtype="PCM_16"
    ),
    "opposite-channels-cancel": lambda: encode(np.stack([sine(1.0), -sine(1.0)], axis=1), subtype="FLOAT"),
    "8-bit-pcm": lambda: encode(sine(1.0, 8000), 8000, subtype="PCM_U8"),
    "24-bit-pcm": lambda: encode(sine(1.0, 48000), 48000, subtype="PCM_24"),
    "64-bit-float": lambda: encode(sine(1.0, 22050), 22050, subtype="DOUBLE"),
    "mu-law": lambda: encode(sine(1.0, 8000), 8000, subtype="ULAW"),
    "ima-adpcm": lambda: encode(sine(1.0, 8000), 8000, subtype="IMA_ADPCM"),
    "truncated-mid-sample": lambda: encode(sine(1.0), subtype="PCM_16")[:-1001],
    "truncated-flac": lambda: encode(sine(2.0), fmt="FLAC")[:-500],
    "riff-and-data-sizes-lie": lambda: handmade_wav(
        b"\x00\x10" * 8000, riff_size=0xFFFFFFFF, data_size=0xFFFFFFFF
    ),
    "float-beyond-full-scale": lambda: encode(
        np.array([0.25, 1.5, -3.0, -0.5] * 4000, dtype=np.float32), subtype="FLOAT"
    ),
    "float-near-float32-max": loud_float,
    "dc-full-scale": lambda: encode(np.full(16000, 32767, dtype=np.int16), subtype="PCM_16"),
    "white-noise-full-scale": lambda: encode(
        np.random.default_rng(8).uniform(-1, 1, 16000).astype(np.float32)
    ),
    "aiff": lambda: encode(sine(1.0), fmt="AIFF", subtype="PCM_16"),
    "ogg-vorbis": lambda: encode(sine(1.0), fmt="OGG", subtype="VORBIS"),
    "mp3": lambda: encode(sine(1.0), fmt="MP3", subtype="MPEG_LAYER_III"),
    "exactly-max-seconds": lambda: encode(np.zeros(8000 * MAX_AUDIO_SECONDS), 8000, subtype="PCM_U8"),
}


@pytest.mark.parametrize("make", ODD_BUT_VALID.values(), ids=ODD_BUT_VALID.keys())
def test_odd_but_valid_audio_is_never_a_5xx(client, make):
    response = client.post("/transcribe", files={"file": ("odd.wav", make(), "audio/wav")})
    if response.status_code == 200:
        body = response.json()
        assert isinstance(body["text"], str)
        assert 0 <= body["duration"] <= MAX_AUDIO_SECONDS + 0.01
    else:
        assert_error_shape(response)


def test_header_only_and_zero_sample_wavs_are_empty_transcripts(client):
    for data in (header_only_wav(), handmade_wav(b"")):
        response = client.post("/transcribe", files={"file": ("empty.wav", data)})
        assert response.status_code == 200, response.text
        assert response.json()["text"] == "" and response.json()["duration"] == 0.0


def test_a_harmless_filename_is_not_used_as_a_path(client, short_wav):
    for filename in ("../../../../etc/passwd", "/dev/zero", "C:\\Windows\\win.ini", "\u202egnp.wav", ""):
        response = client.post("/transcribe", files={"file": (filename, short_wav, "audio/wav")})
        assert response.status_code == 200, response.text
        assert words(response.json()["text"]) == SHORT_TEXT


# -- limits while streaming, and clients that leave ---------------------------------------------------------


@dataclass
class Streamed:
    sent: int  # body bytes the client got out before the answer arrived
    answer: bytes  # the raw HTTP answer
    closed: bool  # the server closed the connection after answering, instead of draining the rest
    drained: int  # body bytes the server still accepted after its answer


def stream_chunked(url: str, offered: int, *, after_answer_s: float = 2.0) -> Streamed:
    """POST a chunked multipart upload of `offered` bytes over a raw socket, reading while sending: what the
    server answers, how much of the body it took first, and whether it then closes or keeps reading."""
    import select

    boundary = b"liteasr-boundary"
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setblocking(False)
    head = (
        b"POST /transcribe HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n"
    )
    part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
    chunk = b"\0" * 2**16
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    pending = head + b"%x\r\n" % len(part) + part + b"\r\n"
    sent = drained = 0
    answer = b""
    answered_at = None
    closed = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if answered_at is not None and time.monotonic() - answered_at > after_answer_s:
                break
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                try:
                    piece = sock.recv(65536)
                except ConnectionError:
                    piece = b""
                if not piece:
                    closed = True
                    break
                answer += piece
                if answered_at is None and b"\r\n\r\n" in answer:
                    answered_at = time.monotonic()
            if writable and sent + drained < offered:
                if not pending:
                    pending = framed
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                except BlockingIOError:
                    n = 0
                pending = pending[n:]
                if not pending:
                    if answered_at is None:
                        sent += len(chunk)
                    else:
                        drained += len(chunk)
    finally:
        sock.close()
    return Streamed(sent, answer, closed, drained)


def test_oversized_chunked_upload_is_refused_while_it_streams(server):
    """No Content-Length: only the streaming count can stop it. The server answers 413 while the client is still
    sending, having taken about the limit (plus what loopback's socket buffers hold), and its memory does not grow
    by the upload's size."""
    offered = 256 * 2**20  # the limit is 1 MiB
    rss_before = rss_mb(server.process.pid)
    streamed = stream_chunked(server.url, offered, after_answer_s=0.3)
    assert streamed.answer.startswith(b"HTTP/1.1 413"), streamed.answer[:300]
    assert b"upload_too_large" in streamed.answer and b"LITEASR_MAX_UPLOAD_MB" in streamed.answer
    assert streamed.sent < 16 * 2**20, f"{streamed.sent / 2**20:.0f} MiB sent before the answer"
    assert rss_mb(server.process.pid) - rss_before < 32


@pytest.mark.xfail(
    strict=True,
    reason="an open gap: after an early answer uvicorn keeps the connection and reads (and drops) the rest of the "
    "body. `Connection: close` stops that, but closing a socket with unread data makes the kernel reset the "
    "connection, and clients then lose the 413 itself (this test failed 1 run in 3 that way); it needs a "
    "lingering close in the server. See docs/reliability.md",
)
def test_the_connection_is_closed_after_refusing_an_upload(server):
    """After its 413 the server should hang up, not read the rest of an upload it has refused."""
    streamed = stream_chunked(server.url, 256 * 2**20, after_answer_s=1.5)
    assert streamed.answer.startswith(b"HTTP/1.1 413"), streamed.answer[:300]
    assert streamed.closed and streamed.drained < 16 * 2**20, (
        f"{streamed.drained / 2**20:.0f} MiB more accepted after the answer"
    )


def test_content_length_over_the_limit_is_refused_before_the_body(server):
    """A declared size over the limit gets 413 from the headers alone: the body is never sent here."""
    boundary = b"liteasr-boundary"
    declared = 512 * 2**20
    head = (
        b"POST /transcribe HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
        b"Content-Length: " + str(declared).encode() + b"\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"upload_too_large" in answer or b"content-length" in answer.lower()


def test_client_that_leaves_mid_upload_frees_its_place(server, client, short_wav):
    boundary = b"liteasr-boundary"
    body = multipart([file_part(short_wav)], boundary)
    host, port = server.url.removeprefix("http://").split(":")
    before = scrape(client)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /transcribe HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[: len(body) // 2]
            )
            time.sleep(0.2)  # admitted, reading the body
    wait_until(
        lambda: (
            value(scrape(client), "liteasr_requests_rejected_total", reason="client_gone")
            - value(before, "liteasr_requests_rejected_total", reason="client_gone")
            == 5
        ),
        what="five client_gone rejections",
    )
    wait_until(lambda: value(scrape(client), "liteasr_requests_in_flight") == 0, what="no request in flight")
    response = client.post("/transcribe", files={"file": ("short.wav", short_wav)})
    assert response.status_code == 200 and words(response.json()["text"]) == SHORT_TEXT


def test_after_everything_a_good_request_still_transcribes(server, client, jfk_flac):
    """Runs after the catalogue (pytest keeps the file's order): the server is live and unharmed."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    response = client.post("/transcribe", files={"file": ("jfk.flac", jfk_flac, "audio/flac")})
    assert response.status_code == 200, response.text
    assert words(response.json()["text"]) == JFK_WORDS
    samples = scrape(client)
    assert value(samples, "liteasr_requests_in_flight") == 0
    assert value(samples, "liteasr_queue_depth") == 0
    # every refusal of the catalogue was counted, under its reason
    expected = Counter(REJECT_REASON[bad.code] for bad in CATALOGUE if bad.code in REJECT_REASON)
    for reason, count in expected.items():
        assert value(samples, "liteasr_requests_rejected_total", reason=reason) >= count, reason
    for status in ("500", "502", "503", "504"):
        assert (
            value(samples, "liteasr_request_duration_seconds_count", endpoint="/transcribe", status=status)
            == 0
        )
    log = server.log(10**7)
    assert "Traceback" not in log
    assert "python_multipart" not in log, "a client's malformed body must not write to the server log"


# -- overload -----------------------------------------------------------------------------------------------

OVERLOAD_REQUESTS = 300
OVERLOAD_CONCURRENCY = 64
OVERLOAD_QUEUE = 16
# Allowed growth of the server's RSS over the burst, measured after a warm-up that ran full batches (see the
# test). What a burst may still add: at most MAX_QUEUE admitted uploads and their decoded audio (16 x ~50 kB
# here), connection buffers for 64 clients, and allocator arenas of threads that had not run yet (a few MB
# each). 150 MB is several times that, yet about the size of one more batch-of-8 high-water mark (~250 MB on
# tiny.en), so a burst that leaked its batches' activations, or buffered the 284 refused uploads, would fail it.
# The soak (bench/soak.py) measures the slope over minutes.
RSS_MARGIN_MB = 150


@pytest.fixture(scope="module")
def overload_server(tiny_en_dir, tmp_path_factory) -> RunningServer:
    work = tmp_path_factory.mktemp("overload")
    settings = {
        "LITEASR_MODEL": str(tiny_en_dir),
        "LITEASR_CACHE_DIR": str(work / "cache"),
        "LITEASR_MAX_QUEUE": str(OVERLOAD_QUEUE),
        "LITEASR_MAX_BATCH_SIZE": "8",
    }
    with serve(settings, work / "server.log") as running:
        yield running


async def burst(
    url: str, data: bytes, requests: int = OVERLOAD_REQUESTS, concurrency: int = OVERLOAD_CONCURRENCY
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def one() -> httpx.Response:
            async with gate:
                return await http.post("/transcribe", files={"file": ("short.wav", data, "audio/wav")})

        return await asyncio.gather(*(one() for _ in range(requests)))


def test_overload_sheds_with_503_and_recovers(overload_server, short_wav):
    with httpx.Client(base_url=overload_server.url, timeout=120) as http:
        # Warm-up: MAX_QUEUE requests at once, all admitted, so full batches of 8 have run once and the
        # high-water mark of a batch (eager attention over 8 windows: hundreds of MB, kept by the allocator) is
        # reached before the baseline is taken.
        warm = asyncio.run(burst(overload_server.url, short_wav, OVERLOAD_QUEUE, OVERLOAD_QUEUE))
        assert all(r.status_code == 200 and words(r.json()["text"]) == SHORT_TEXT for r in warm)
        rss_before = rss_mb(overload_server.process.pid)
        started = time.monotonic()
        responses = asyncio.run(burst(overload_server.url, short_wav))
        elapsed = time.monotonic() - started

        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 503}, statuses
        for response in responses:
            if response.status_code == 200:
                assert words(response.json()["text"]) == SHORT_TEXT, response.text
            else:
                assert_error_shape(response, 503, "queue_full")
                assert int(response.headers["retry-after"]) >= 1
        assert statuses[200] >= OVERLOAD_QUEUE, statuses

        def settled() -> bool:
            samples = scrape(http)
            return (
                value(samples, "liteasr_requests_in_flight") == 0
                and value(samples, "liteasr_queue_depth") == 0
            )

        wait_until(settled, what="in-flight and queue gauges back to 0")
        samples = scrape(http)
        assert value(samples, "liteasr_requests_rejected_total", reason="queue_full") == statuses[503]
        assert value(samples, "liteasr_windows_running") == 0
        rss_after = rss_mb(overload_server.process.pid)
        print(
            f"overload: {dict(statuses)} in {elapsed:.1f} s; server RSS {rss_before:.0f} -> {rss_after:.0f} MB"
        )
        assert rss_after - rss_before < RSS_MARGIN_MB, (rss_before, rss_after)
        # and it still serves
        after = http.post("/transcribe", files={"file": ("short.wav", short_wav)})
        assert after.status_code == 200 and words(after.json()["text"]) == SHORT_TEXT
    assert "Traceback" not in overload_server.log(10**7)
