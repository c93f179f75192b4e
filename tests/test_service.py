"""The service end to end: `python -m app` in a subprocess, real HTTP, the real Whisper tiny.en.

Two servers per module: `server` (batching tuned so concurrent clients share batches, small upload/duration
limits) serves most tests; `small_server` (MAX_QUEUE=2) plays one scripted scenario: a client that leaves while
queued, a full queue, and SIGTERM with requests still running.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch
from helpers import JFK, assert_error_shape, scrape, value, wait_until, words
from server import RunningServer, serve

from liteasr.evaluate import wer_scores

pytestmark = pytest.mark.real

MAX_UPLOAD_MB = 2
MAX_AUDIO_SECONDS = 80
MAX_BATCH_SIZE = 8


# -- helpers ------------------------------------------------------------------------------------------------


def wav_bytes(audio: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def shared_steps(samples: dict) -> float:
    """Decode steps over more than one row so far."""
    return value(samples, "liteasr_decode_step_rows_count") - value(
        samples, "liteasr_decode_step_rows_bucket", le="1.0"
    )


async def post_many(url: str, requests: list[dict]) -> list[httpx.Response]:
    """POST all at once (each dict: path plus httpx keyword arguments)."""
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        return await asyncio.gather(*(client.post(r.pop("path"), **r) for r in requests))


# -- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jfk_wav(clip_path) -> bytes:
    audio, rate = sf.read(clip_path("jfk"), dtype="float32")
    return wav_bytes(audio, rate)


@pytest.fixture(scope="module")
def jfk_file(jfk_wav) -> dict:
    return {"file": ("jfk.wav", jfk_wav, "audio/wav")}


@pytest.fixture(scope="module")
def server(tiny_en_dir, tmp_path_factory) -> RunningServer:
    work = tmp_path_factory.mktemp("service")
    settings = {
        "LITEASR_MODEL": str(tiny_en_dir),
        "LITEASR_CACHE_DIR": str(work / "cache"),
        "LITEASR_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
        "LITEASR_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "LITEASR_MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
    }
    with serve(settings, work / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=180) as http:
        yield http


# -- the main server ------------------------------------------------------------------------------------------


def test_ready_and_live(client):
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/healthz").status_code == 200


def test_jfk_wav_transcribes(client, jfk_file, tiny_en_dir):
    response = client.post("/transcribe", files=jfk_file)
    assert response.status_code == 200, response.text
    body = response.json()
    assert words(body["text"]) == words(JFK)
    assert body["language"] == "en"
    assert body["duration"] == pytest.approx(11.0, abs=0.05)
    assert body["model"] == tiny_en_dir.name
    assert body["windows"] == 1
    assert "segments" not in body
    timings = body["timings"]
    assert set(timings) == {"queue_wait_s", "inference_s", "batch_size", "decode_s", "total_s"}
    assert timings["batch_size"] >= 1
    assert 0 < timings["inference_s"] <= timings["total_s"]


def test_concurrent_clients_share_decode_steps(server, client, jfk_file):
    before = scrape(client)
    responses = asyncio.run(
        post_many(server.url, [{"path": "/transcribe", "files": jfk_file} for _ in range(8)])
    )
    after = scrape(client)

    for response in responses:
        assert response.status_code == 200, response.text
        assert words(response.json()["text"]) == words(JFK)
    assert max(r.json()["timings"]["batch_size"] for r in responses) > 1
    assert shared_steps(after) > shared_steps(before)
    assert value(after, "liteasr_windows_total") - value(before, "liteasr_windows_total") == 8


def test_response_formats(server, jfk_file):
    formats = [
        ("json", "true"),
        ("text", "false"),
        ("srt", "false"),
        ("vtt", "false"),
        ("verbose_json", "false"),
    ]
    requests = [
        {"path": "/transcribe", "files": jfk_file, "data": {"response_format": f, "timestamps": ts}}
        for f, ts in formats
    ]
    as_json, as_text, as_srt, as_vtt, verbose = asyncio.run(post_many(server.url, requests))
    for response in (as_json, as_text, as_srt, as_vtt, verbose):
        assert response.status_code == 200, response.text

    segments = as_json.json()["segments"]
    assert segments and words(" ".join(s["text"] for s in segments)) == words(JFK)
    assert all(0 <= s["start"] <= s["end"] <= 11.0 + 1e-6 for s in segments)
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments)

    assert as_text.headers["content-type"].startswith("text/plain")
    assert words(as_text.text) == words(JFK)

    srt_cues = re.findall(
        r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+?)\n(?:\n|$)", as_srt.text, re.DOTALL
    )
    assert srt_cues, as_srt.text
    assert [int(c[0]) for c in srt_cues] == list(range(1, len(srt_cues) + 1))
    assert all(start <= end for _, start, end, _ in srt_cues)
    assert words(" ".join(c[3] for c in srt_cues)) == words(JFK)

    assert as_vtt.text.startswith("WEBVTT\n\n")
    vtt_cues = re.findall(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n(.+?)\n", as_vtt.text)
    assert len(vtt_cues) == len(srt_cues)
    assert words(" ".join(c[2] for c in vtt_cues)) == words(JFK)

    body = verbose.json()
    assert {"task", "language", "duration", "text", "segments", "model", "timings"} <= set(body)
    assert body["task"] == "transcribe" and body["language"] == "en"
    assert words(body["text"]) == words(JFK)
    segment_fields = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob"}
    assert segment_fields | {"compression_ratio", "no_speech_prob"} <= set(body["segments"][0])
    assert [s["id"] for s in body["segments"]] == list(range(len(body["segments"])))


def test_openai_client(server, jfk_wav, tiny_en_dir):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)
    upload = ("jfk.wav", jfk_wav, "audio/wav")
    with ThreadPoolExecutor(3) as pool:
        plain = pool.submit(client.audio.transcriptions.create, model="whisper-1", file=upload)
        verbose = pool.submit(
            client.audio.transcriptions.create,
            model="whisper-1",
            file=upload,
            response_format="verbose_json",
            timestamp_granularities=["segment"],
            language="en",
            prompt="ignored",
            temperature=0.0,
        )
        subtitles = pool.submit(
            client.audio.transcriptions.create, model="whisper-1", file=upload, response_format="srt"
        )
        plain, verbose, subtitles = plain.result(), verbose.result(), subtitles.result()

    assert words(plain.text) == words(JFK)
    assert words(verbose.text) == words(JFK)
    assert verbose.language == "en" and verbose.duration == pytest.approx(11.0, abs=0.05)
    assert verbose.segments and verbose.segments[0].start == pytest.approx(0.0, abs=1.0)
    assert isinstance(subtitles, str) and subtitles.startswith("1\n00:00:")

    assert [model.id for model in client.models.list()] == [tiny_en_dir.name]
    assert client.models.retrieve(tiny_en_dir.name).id == tiny_en_dir.name

    with pytest.raises(openai.BadRequestError) as refused:  # tiny.en is English-only
        client.audio.translations.create(model="whisper-1", file=upload)
    assert refused.value.code == "invalid_option"


def test_metrics_appear_and_move(client, jfk_file, tiny_en_dir):
    before = scrape(client)
    assert client.post("/transcribe", files=jfk_file).status_code == 200
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("liteasr_request_duration_seconds_count", endpoint="/transcribe", status="200") == 1
    assert delta("liteasr_audio_seconds_total") == pytest.approx(11.0, abs=0.05)
    assert delta("liteasr_windows_total") == 1
    assert delta("liteasr_queue_wait_seconds_count") == 1
    assert delta("liteasr_encoder_pass_duration_seconds_count") == 1
    assert delta("liteasr_encoder_pass_windows_sum") == 1
    assert delta("liteasr_decode_step_duration_seconds_count") >= 20  # one step per token
    assert delta("liteasr_decode_step_rows_sum") == delta("liteasr_decode_step_duration_seconds_count")
    assert delta("liteasr_decoded_tokens_total") >= 20 and delta("liteasr_model_busy_seconds_total") > 0
    for gauge in ("liteasr_queue_depth", "liteasr_requests_in_flight", "liteasr_windows_running"):
        assert (gauge, frozenset()) in after
    assert value(after, "liteasr_requests_in_flight") == 0
    assert value(after, "liteasr_ready") == 1
    info = next(dict(labels) for name, labels in after if name == "liteasr_model_info")
    assert info["model"] == tiny_en_dir.name
    assert info["device"] in ("cpu", "cuda:0") and info["dtype"] in ("float32", "float16")
    assert info["quantization"] == (
        "int8-decoder" if info["device"] == "cpu" else "none"
    )  # LITEASR_INT8 default
    amx = info["device"] == "cpu" and torch.cpu._is_amx_tile_supported()
    assert info["encoder_dtype"] == ("bfloat16" if amx else info["dtype"])  # LITEASR_BF16=auto
    assert int(info["encoder_parameters"]) > 1_000_000
    reasons = {dict(labels)["reason"] for name, labels in after if name == "liteasr_requests_rejected_total"}
    assert {
        "queue_full",
        "too_large",
        "too_long",
        "bad_audio",
        "bad_option",
        "timeout",
        "client_gone",
    } <= reasons
    buckets = [
        float(dict(labels)["le"]) for name, labels in after if name == "liteasr_decode_step_rows_bucket"
    ]
    assert buckets[:MAX_BATCH_SIZE] == [float(i) for i in range(1, MAX_BATCH_SIZE + 1)]


def test_long_clip_is_windowed_and_stitched(client, clip_path, manifest_rows):
    row = next(r for r in manifest_rows if r["id"] == "asterisk_demo-instruct")
    audio = clip_path(row["id"]).read_bytes()
    response = client.post(
        "/transcribe", files={"file": ("long.flac", audio, "audio/flac")}, data={"timestamps": "true"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["duration"] == pytest.approx(row["duration"], abs=0.05)
    assert body["windows"] == 3
    assert wer_scores([row["text"]], [body["text"]]).corpus_wer < 0.15, body["text"]
    starts = [s["start"] for s in body["segments"]]
    assert starts == sorted(starts)
    assert body["segments"][-1]["end"] > 60.0
    assert all(s["end"] <= body["duration"] + 0.5 for s in body["segments"])


@pytest.fixture(scope="module")
def small_server(tiny_en_dir, tmp_path_factory) -> RunningServer:
    work = tmp_path_factory.mktemp("small-service")
    settings = {
        "LITEASR_MODEL": str(tiny_en_dir),
        "LITEASR_CACHE_DIR": str(work / "cache"),
        "LITEASR_MAX_QUEUE": "2",
        "LITEASR_MAX_BATCH_SIZE": "1",  # one decoder row: the order of service is visible
        "LITEASR_SHUTDOWN_GRACE_S": "120",
    }
    with serve(settings, work / "server.log") as running:
        yield running


def test_client_gone_queue_full_fairness_and_graceful_shutdown(small_server, clip_path, jfk_file):
    url = small_server.url
    audio, rate = sf.read(clip_path("asterisk_demo-instruct"), dtype="float32")
    twice = io.BytesIO()
    sf.write(twice, np.concatenate([audio, audio]), rate, format="FLAC")  # 147 s: 5 or 6 windows
    long_file = {"file": ("long.flac", twice.getvalue(), "audio/flac")}
    one_window = io.BytesIO()
    sf.write(one_window, audio[: 29 * rate], rate, format="FLAC")
    dense_window = {"file": ("window.flac", one_window.getvalue(), "audio/flac")}
    finished: dict[str, float] = {}

    def post(name: str, files: dict) -> httpx.Response:
        response = httpx.post(f"{url}/transcribe", files=files, timeout=300)
        finished[name] = time.monotonic()
        return response

    with httpx.Client(base_url=url, timeout=30) as monitor, ThreadPoolExecutor(2) as pool:

        def gauge(name: str, **labels: str) -> float:
            return value(scrape(monitor), name, **labels)

        # A: a long file; wait until the model decodes its first window.
        long_request = pool.submit(post, "long", long_file)
        wait_until(lambda: gauge("liteasr_windows_running") > 0, what="the long request's first window")

        # B: admitted behind A, then its client gives up: its window is dropped from the queue, or its row freed
        # if it had started decoding (it takes the row after A's first window: B has had fewer windows). B is one
        # window of dense speech (~100 tokens), so it cannot finish inside its 1 s read timeout even when A's
        # window ends just as B arrives (jfk could, on a fast machine).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/transcribe", files=dense_window, timeout=httpx.Timeout(30.0, read=1.0))

        def forgotten() -> float:
            samples = scrape(monitor)
            return value(samples, "liteasr_windows_dropped_total", reason="client_gone") + value(
                samples, "liteasr_rows_freed_total", reason="client_gone"
            )

        wait_until(lambda: forgotten() == 1, what="the dropped window")
        assert gauge("liteasr_requests_rejected_total", reason="client_gone") == 1

        # C fills the queue (A + C = MAX_QUEUE); D is refused before its upload is read.
        short_request = pool.submit(post, "short", jfk_file)
        wait_until(lambda: gauge("liteasr_requests_in_flight") == 2, what="the second admission")
        refused = monitor.post("/transcribe", files=jfk_file)
        assert_error_shape(refused, 503, "queue_full")
        assert int(refused.headers["retry-after"]) >= 1
        samples = scrape(monitor)
        assert value(samples, "liteasr_requests_rejected_total", reason="queue_full") == 1
        assert value(samples, "liteasr_requests_in_flight") == 2, (
            "A finished too early: the scenario lost its race"
        )

        # SIGTERM while A and C are admitted: both are answered, then the process exits 0.
        assert small_server.terminate(timeout=300) == 0, small_server.log()
        done_long, done_short = long_request.result(), short_request.result()

    assert done_long.status_code == 200, done_long.text
    assert done_long.json()["windows"] >= 5
    assert done_short.status_code == 200, done_short.text
    assert words(done_short.json()["text"]) == words(JFK)
    assert finished["short"] < finished["long"], (
        "the short request waited behind every window of the long one"
    )
    assert "Traceback" not in small_server.log(50000)
