"""Live transcription over OpenAI's Realtime protocol: the real server, a plain `websockets` client, real tiny.en.

Audio goes in as the protocol has it: base64 PCM16 at 24 kHz in `input_audio_buffer.append` events. One test
streams at real-time pace; the others send as fast as the socket takes it.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import soxr
from helpers import JFK, scrape, value, wait_until, words
from server import RunningServer, serve_model
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from liteasr.audio import SAMPLE_RATE, load_audio
from liteasr.evaluate import wer_scores

pytestmark = pytest.mark.real

RATE = 24000
CHUNK_SECONDS = 0.1


@pytest.fixture(scope="module")
def server(tiny_en_dir, tmp_path_factory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("realtime")
    settings = {"LITEASR_MAX_BATCH_SIZE": "4", "LITEASR_REALTIME_IDLE_TIMEOUT_S": "5"}
    with serve_model(tiny_en_dir, work, **settings) as running:
        yield running


def pcm24k(audio: np.ndarray) -> bytes:
    resampled = soxr.resample(audio, SAMPLE_RATE, RATE)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(pcm: bytes, seconds: float = CHUNK_SECONDS) -> Iterator[str]:
    size = int(RATE * seconds) * 2
    for start in range(0, len(pcm), size):
        yield json.dumps(
            {
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(pcm[start : start + size]).decode(),
            }
        )


def open_session(server: RunningServer, **input_settings) -> ClientConnection:
    ws = connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription", open_timeout=30)
    created = json.loads(ws.recv(timeout=30))
    assert created["type"] == "session.created" and created["event_id"]
    update = {
        "type": "session.update",
        "session": {"type": "transcription", "audio": {"input": input_settings}},
    }
    ws.send(json.dumps(update))
    updated = json.loads(ws.recv(timeout=30))
    assert updated["type"] == "session.updated", updated
    return ws


def events_until(ws: ClientConnection, kind: str, timeout: float = 60) -> list[dict]:
    """Every event up to and including the first of `kind`."""
    received, deadline = [], time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        received.append(event)
        if event["type"] == kind:
            return received


@pytest.fixture(scope="module")
def jfk(clip_path) -> np.ndarray:
    return load_audio(clip_path("jfk"))


def test_server_vad_turns_at_real_time_pace(server, jfk):
    """The clip, then 1.5 s of silence, sent as a microphone would: the server cuts it into turns at its pauses
    (500 ms of silence), streams each turn's text, and completes the last one soon after the speech ends."""
    ws = open_session(server, format={"type": "audio/pcm", "rate": RATE})
    silence = np.zeros(int(1.5 * SAMPLE_RATE), dtype=np.float32)
    started = time.monotonic()
    for index, event in enumerate(chunks(pcm24k(np.concatenate([jfk, silence])))):
        ws.send(event)
        time.sleep(max(0.0, started + (index + 1) * CHUNK_SECONDS - time.monotonic()))
    sent = time.monotonic()
    received, arrived = [], []
    while True:  # until every committed turn is completed and nothing more comes
        try:
            received.append(json.loads(ws.recv(timeout=3.0)))
        except TimeoutError:
            break
        arrived.append(time.monotonic())
    ws.close()
    kinds = [e["type"] for e in received]
    committed = [e["item_id"] for e in received if e["type"] == "input_audio_buffer.committed"]
    completed = [e for e in received if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert (
        len(committed) >= 2 and [e["item_id"] for e in completed] == committed
    )  # JFK pauses between phrases
    assert kinds.count("input_audio_buffer.speech_started") == kinds.count(
        "input_audio_buffer.speech_stopped"
    )
    for item in committed:  # each turn's deltas join to its transcript
        deltas = [e["delta"] for e in received if e.get("item_id") == item and e["type"].endswith(".delta")]
        assert "".join(deltas) == next(e["transcript"] for e in completed if e["item_id"] == item)
    stops = [e["audio_end_ms"] for e in received if e["type"] == "input_audio_buffer.speech_stopped"]
    assert stops == sorted(stops) and 10_000 <= stops[-1] <= 12_000  # the speech ends near 11 s
    transcript = " ".join(e["transcript"] for e in completed)
    # Turns of 1-2 s give Whisper little context: "And so am I fellow Americans" is as good as tiny.en gets here
    # (2 errors in 22 words); the upload of the whole clip makes none.
    assert wer_scores([JFK], [transcript]).corpus_wer <= 0.1, transcript
    # The last caption came within 2 s of the last audio sent (itself 1.5 s of silence after the speech).
    last_completed_at = max(t for t, e in zip(arrived, received, strict=True) if e in completed)
    assert last_completed_at - sent < 2.0, last_completed_at - sent


def test_manual_commits_with_turn_detection_off(server, jfk):
    ws = open_session(server, format={"type": "audio/pcm", "rate": RATE}, turn_detection=None)
    for event in chunks(pcm24k(jfk), seconds=1.0):
        ws.send(event)
    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    received = events_until(ws, "conversation.item.input_audio_transcription.completed")
    assert "input_audio_buffer.speech_started" not in [e["type"] for e in received]
    assert words(received[-1]["transcript"]) == words(JFK)
    # An empty buffer cannot be committed; clear answers cleared.
    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    assert json.loads(ws.recv(timeout=10))["error"]["code"] == "input_audio_buffer_commit_empty"
    ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
    assert json.loads(ws.recv(timeout=10))["type"] == "input_audio_buffer.cleared"
    ws.close()


def test_malformed_events_get_errors_and_the_session_goes_on(server, jfk):
    ws = open_session(server, turn_detection=None, format={"type": "audio/pcm", "rate": 16000})
    for bad, code in [
        ("{not json", "invalid_json"),
        (json.dumps({"type": "response.create"}), "unknown_event"),
        (json.dumps([1, 2]), "invalid_event"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_event"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), "invalid_event"),  # 3 bytes: odd
        (
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}},
                }
            ),
            "invalid_event",
        ),
        (
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"transcription": {"language": "de"}}}},
                }
            ),
            "invalid_option",
        ),
    ]:
        ws.send(bad)
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["code"] == code, (bad, error)
        assert set(error["error"]) >= {"type", "code", "message", "param", "event_id"}
    pcm16 = (jfk * 32767).astype("<i2").tobytes()  # 16 kHz, as the session says
    ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16).decode()}))
    ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    received = events_until(ws, "conversation.item.input_audio_transcription.completed")
    assert words(received[-1]["transcript"]) == words(JFK)
    ws.close()


def test_binary_frames_and_floods_close_the_session(server):
    ws = open_session(server)
    ws.send(b"\x00\x01garbage")
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1003

    ws = open_session(server)
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(2000):
            ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        while True:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008


def test_long_silence_a_vanishing_client_and_idle_sessions_leave_nothing_behind(server, jfk):
    with httpx.Client(base_url=server.url, timeout=30) as monitor:
        # Ten minutes of silence, as fast as it goes: no turn, a bounded buffer.
        ws = open_session(server, format={"type": "audio/pcm", "rate": RATE})
        for event in chunks(bytes(2 * RATE * 600), seconds=2.0):
            ws.send(event)
        ws.send(json.dumps({"type": "session.update", "session": {}}))
        answer = events_until(ws, "session.updated", timeout=120)
        assert [e["type"] for e in answer] == ["session.updated"]
        ws.close()
        # A client that vanishes mid-turn.
        ws = open_session(server, turn_detection=None)
        for event in chunks(pcm24k(np.tile(jfk, 2)), seconds=2.0):
            ws.send(event)
        ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events_until(ws, "input_audio_buffer.committed")
        ws.close()
        wait_until(
            lambda: (
                value(samples := scrape(monitor), "liteasr_realtime_sessions") == 0
                and value(samples, "liteasr_requests_in_flight") == 0
                and value(samples, "liteasr_windows_running") == 0
                and value(samples, "liteasr_queue_depth") == 0
            ),
            what="an idle server",
        )
        # An idle session is closed after LITEASR_REALTIME_IDLE_TIMEOUT_S, with an error event first.
        ws = open_session(server)
        error = json.loads(ws.recv(timeout=20))
        assert error["type"] == "error" and error["error"]["code"] == "idle"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        samples = scrape(monitor)
        assert value(samples, "liteasr_realtime_closes_total", reason="idle") >= 1
        assert value(samples, "liteasr_realtime_turns_total", result="completed") >= 1
        assert value(samples, "liteasr_realtime_caption_latency_seconds_count") >= 1
        assert monitor.get("/readyz").status_code == 200


def test_the_openai_clients_realtime_api_works(server, jfk):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}},
            }
        )
        assert connection.recv().type == "session.updated"
        pcm = pcm24k(jfk)
        for start in range(0, len(pcm), 2 * RATE):
            connection.input_audio_buffer.append(
                audio=base64.b64encode(pcm[start : start + 2 * RATE]).decode()
            )
        connection.input_audio_buffer.commit()
        deltas = []
        for event in connection:
            if event.type == "conversation.item.input_audio_transcription.delta":
                deltas.append(event.delta)
            if event.type == "conversation.item.input_audio_transcription.completed":
                break
    assert "".join(deltas) == event.transcript and words(event.transcript) == words(JFK)


def test_partial_captions_while_a_turn_is_spoken(server, clip_path):
    """`?partials=true` (an extension): a long turn is decoded again while it is spoken; the partials come before
    its commit and grow towards its transcript."""
    speech = load_audio(clip_path("asterisk_demo-instruct"))[: 9 * SAMPLE_RATE]  # no 500 ms pause in it
    audio = np.concatenate([speech, np.zeros(int(1.5 * SAMPLE_RATE), dtype=np.float32)])
    ws = connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription&partials=true")
    assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    started = time.monotonic()
    for index, event in enumerate(chunks(pcm24k(audio))):
        ws.send(event)
        time.sleep(max(0.0, started + (index + 1) * CHUNK_SECONDS - time.monotonic()))
    received = events_until(ws, "conversation.item.input_audio_transcription.completed")
    ws.close()
    kinds = [e["type"] for e in received]
    partials = [e for e in received if e["type"] == "conversation.item.input_audio_transcription.partial"]
    assert len(partials) >= 2, kinds
    assert kinds.index("conversation.item.input_audio_transcription.partial") < kinds.index(
        "input_audio_buffer.committed"
    )
    final = received[-1]["transcript"]
    assert {p["item_id"] for p in partials} == {received[-1]["item_id"]}
    assert len(words(partials[-1]["transcript"]).split()) > len(words(partials[0]["transcript"]).split())
    assert words(partials[-1]["transcript"]).split()[:3] == words(final).split()[:3]
