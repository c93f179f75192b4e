"""Streaming, word timestamps, prompts and temperature, end to end: `python -m app` over real HTTP, the real
Whisper tiny.en, the official `openai` client where it applies.

The server decodes in float32 (`LITEASR_INT8=off`): with the dynamic int8 decoder a row's tokens may depend on the
rows that share its steps, and these tests compare two decodings of the same audio (streamed and not).
"""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from helpers import JFK, assert_error_shape, scrape, value, wait_until, words
from server import RunningServer, serve_model
from signals import no_speech

from liteasr.audio import SAMPLE_RATE, load_audio

pytestmark = pytest.mark.real

LONG_CLIP = "asterisk_demo-instruct"  # 73 s: three windows
PROMPTED_CLIP = "asterisk_vm-intro"  # "... When done hang up or press the pound key."
SPELLING_PROMPT = "When done, hang-up or press the Pound-Key."


def flac(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def events(response: httpx.Response) -> list[tuple[float, dict]]:
    """(arrival time, event) of every `data:` line of an SSE response being read."""
    received = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            received.append((time.monotonic(), json.loads(line[len("data: ") :])))
    return received


@pytest.fixture(scope="module")
def server(tiny_en_dir, tmp_path_factory) -> RunningServer:
    work = tmp_path_factory.mktemp("api-features")
    with serve_model(tiny_en_dir, work, LITEASR_MAX_BATCH_SIZE="4", LITEASR_INT8="off") as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def long_flac(clip_path) -> bytes:
    return flac(load_audio(clip_path(LONG_CLIP)))


def test_openai_client_streams_deltas_whose_text_is_the_transcript(client, long_flac):
    started = time.monotonic()
    stream = client.audio.transcriptions.create(model="whisper-1", file=("long.flac", long_flac), stream=True)
    received = [(time.monotonic(), event) for event in stream]
    deltas = [(at, e) for at, e in received if e.type == "transcript.text.delta"]
    done_at, done = received[-1]
    assert done.type == "transcript.text.done" and [e.type for _, e in received[:-1]] == [
        "transcript.text.delta"
    ] * len(deltas)
    assert len(deltas) > 20  # token by token, not one event per window
    # The first text arrives long before the whole answer: it does not wait for three windows to decode.
    assert deltas[0][0] - started < 0.5 * (done_at - started), (deltas[0][0] - started, done_at - started)
    streamed = "".join(e.delta for _, e in deltas)
    assert streamed == done.text
    whole = client.audio.transcriptions.create(model="whisper-1", file=("long.flac", long_flac))
    assert done.text == whole.text
    assert done.usage is not None


def test_transcribe_streams_with_word_timestamps_in_its_done_event(server, clip_path):
    audio = flac(load_audio(clip_path("jfk")))
    with httpx.stream(
        "POST",
        f"{server.url}/transcribe",
        files={"file": ("jfk.flac", audio)},
        data={"stream": "true", "timestamps": "word"},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = [event for _, event in events(response)]
    done = received[-1]
    assert done["type"] == "transcript.text.done"
    assert "".join(e["delta"] for e in received[:-1]) == done["text"]
    assert words(done["text"]) == words(JFK)
    assert "".join(w["word"] for w in done["words"]).strip() == done["text"]
    assert done["language"] == "en" and done["duration"] > 10 and done["timings"]["total_s"] > 0
    assert done["segments"]


def test_a_client_that_leaves_mid_stream_frees_its_rows(server, long_flac):
    with httpx.Client(base_url=server.url, timeout=60) as monitor:
        before = scrape(monitor)
        with httpx.stream(
            "POST",
            f"{server.url}/v1/audio/transcriptions",
            files={"file": ("long.flac", long_flac)},
            data={"stream": "true"},
            timeout=120,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["type"] == "transcript.text.delta"
                    break  # leave after the first delta
        gone = ("liteasr_rows_freed_total", "liteasr_windows_dropped_total")

        def forgotten(samples) -> float:
            return sum(value(samples, name, reason="client_gone") for name in gone)

        wait_until(lambda: forgotten(scrape(monitor)) > forgotten(before), what="the freed rows")
        wait_until(
            lambda: (
                value(samples := scrape(monitor), "liteasr_requests_in_flight") == 0
                and value(samples, "liteasr_queue_depth") == 0
                and value(samples, "liteasr_windows_running") == 0
            ),
            what="an idle server",
        )
        assert value(scrape(monitor), "liteasr_stream_first_event_seconds_count") >= 1
        # The server goes on serving.
        answer = monitor.post("/v1/audio/transcriptions", files={"file": ("l.flac", long_flac)})
        assert answer.status_code == 200


def test_errors_before_the_first_event_keep_their_status(server):
    not_audio = {"file": ("a.wav", b"this is not audio", "audio/wav")}
    for path in ("/v1/audio/transcriptions", "/transcribe"):
        refused = httpx.post(f"{server.url}{path}", files=not_audio, data={"stream": "true"}, timeout=60)
        assert_error_shape(refused, 415, "unsupported_audio")
    wrong_format = httpx.post(
        f"{server.url}/v1/audio/transcriptions",
        files=not_audio,
        data={"stream": "true", "response_format": "srt"},
        timeout=60,
    )
    assert "stream" in assert_error_shape(wrong_format, 400)["message"]


def test_bad_combinations_are_refused_with_the_reason(server, clip_path):
    audio = {"file": ("jfk.flac", flac(load_audio(clip_path("jfk"))))}
    url = f"{server.url}/v1/audio/transcriptions"
    words_as_text = httpx.post(
        url, files=audio, data={"timestamp_granularities[]": "word", "response_format": "text"}, timeout=60
    )
    assert "verbose_json" in assert_error_shape(words_as_text, 400, "unsupported_parameter")["message"]
    plain_words = httpx.post(
        f"{server.url}/transcribe", files=audio, data={"timestamps": "word", "response_format": "srt"}
    )
    assert "timestamps=word" in assert_error_shape(plain_words, 400)["message"]


def test_word_timestamps_on_spliced_audio(client, clip_path):
    """Clip A, 2.0 s of silence, clip B: B's first word starts where B's speech does. (A and B are one voice at
    one level: after a louder voice, tiny.en tends to end the window at the pause and skip B altogether.)"""
    first = load_audio(
        clip_path("asterisk_check-number-dial-again")
    )  # "Please check the number and dial again."
    second = load_audio(clip_path("asterisk_conf-enteringno"))  # "You are entering conference number"
    silence = np.zeros(int(2.0 * SAMPLE_RATE), dtype=np.float32)
    spliced = np.concatenate([first, silence, second])
    # Where B's speech starts: its first 20 ms frame above a tenth of its loudest.
    frames = second[: len(second) // 320 * 320].reshape(-1, 320)
    level = np.sqrt(np.square(frames).mean(axis=1))
    b_speech = (len(first) + len(silence)) / SAMPLE_RATE + int(np.argmax(level > 0.1 * level.max())) * 0.02
    answer = client.audio.transcriptions.create(
        model="whisper-1",
        file=("spliced.flac", flac(spliced)),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    listed = answer.words
    assert "".join(w.word for w in listed).strip() == answer.text
    starts = [w.start for w in listed]
    assert starts == sorted(starts) and all(w.end >= w.start for w in listed)
    assert listed[0].start >= 0 and listed[-1].end <= len(spliced) / SAMPLE_RATE
    assert answer.segments  # both granularities were asked for
    b_first = 1 + max(i for i, w in enumerate(listed) if words(w.word) == "again")  # after A's last word
    assert words(listed[b_first].word) == "you"
    assert abs(listed[b_first].start - b_speech) <= 0.3, (listed[b_first].start, b_speech)


def test_a_prompt_carries_its_spelling_and_a_long_one_is_cut(client, clip_path):
    audio = ("vm.flac", flac(load_audio(clip_path(PROMPTED_CLIP))))
    plain = client.audio.transcriptions.create(model="whisper-1", file=audio).text
    prompted = client.audio.transcriptions.create(model="whisper-1", file=audio, prompt=SPELLING_PROMPT).text
    assert "Pound-Key" not in plain and "Pound-Key" in prompted, (plain, prompted)
    assert words(prompted) == words(plain)  # the same words, the prompt's spelling
    long_prompt = " ".join(["conference"] * 1000)  # 1,000 tokens: the last 223 are kept
    cut = client.audio.transcriptions.create(model="whisper-1", file=audio, prompt=long_prompt).text
    assert "leave your message" in cut.lower()


def test_temperature_starts_the_ladder_and_stays_reproducible(client, clip_path):
    audio = ("jfk.flac", flac(load_audio(clip_path("jfk"))))
    sampled = [
        client.audio.transcriptions.create(model="whisper-1", file=audio, temperature=0.6).text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # one seed per window: the same audio gives the same text
    assert len(words(sampled[0]).split()) > 10


def test_vad_gives_no_words_on_audio_without_speech_and_skips_it(server):
    """Silence, noise, tones, music, hum (10-60 s each): nothing decoded with the server's default VAD, every
    second counted as skipped. (Without VAD, music gives "Thank you.": docs/vad.md.)"""
    url = f"{server.url}/transcribe"
    with httpx.Client(timeout=300) as http:
        skipped_before = value(scrape(httpx.Client(base_url=server.url)), "liteasr_vad_skipped_seconds_total")
        total = 0.0
        for name, audio in no_speech().items():
            answer = http.post(url, files={"file": (f"{name}.flac", flac(audio))})
            assert answer.status_code == 200, answer.text
            assert answer.json()["text"] == "", (name, answer.json()["text"])
            assert answer.json()["windows"] == 0
            total += len(audio) / SAMPLE_RATE
        skipped = value(scrape(httpx.Client(base_url=server.url)), "liteasr_vad_skipped_seconds_total")
        assert skipped - skipped_before == pytest.approx(total, abs=0.5)


def test_vad_keeps_the_times_of_the_original_audio(client, clip_path):
    silence = np.zeros(int(6.0 * SAMPLE_RATE), dtype=np.float32)
    audio = flac(np.concatenate([silence, load_audio(clip_path("jfk"))]))
    for strategy in ("auto", {"type": "server_vad", "threshold": 0.4, "silence_duration_ms": 800}):
        answer = client.audio.transcriptions.create(
            model="whisper-1",
            file=("late.flac", audio),
            response_format="verbose_json",
            timestamp_granularities=["word"],
            chunking_strategy=strategy,
        )
        assert words(answer.text) == words(JFK)
        assert 6.0 <= answer.words[0].start <= 6.8, answer.words[0]


def test_unknown_chunking_strategies_are_refused_with_the_reason(server, clip_path):
    audio = {"file": ("jfk.flac", flac(load_audio(clip_path("jfk"))))}
    for strategy in ("sometimes", '{"type": "client_vad"}', '{"type": "server_vad", "loudness": 3}'):
        refused = httpx.post(
            f"{server.url}/v1/audio/transcriptions", files=audio, data={"chunking_strategy": strategy}
        )
        assert "chunking_strategy" in assert_error_shape(refused, 400)["message"], strategy
    out_of_range = httpx.post(
        f"{server.url}/transcribe",
        files=audio,
        data={"chunking_strategy": '{"type":"server_vad","threshold":2}'},
    )
    assert "threshold" in assert_error_shape(out_of_range, 400, "invalid_option")["message"]
