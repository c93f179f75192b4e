"""The page at `GET /`, driven in a real headless Chromium against the real server (`python -m app`, tiny.en).

Needs Playwright (the `test` extra) and Debian's `chromium` at /usr/bin/chromium (`.ci/run` installs both);
Playwright's own browser download is not used, so the tests run offline.

The microphone is Chromium's fake capture device fed by a WAV file. One test records against the real
`/v1/realtime` and waits for the captions; the page's side of the protocol (event order, errors, commit on stop,
both audio paths) is checked in detail against a fake server (Playwright's WebSocket routing) that answers as
OpenAI's Realtime transcription API does; the audio the page sent is then transcribed by the real server, which
shows it is 24 kHz PCM16. A refused handshake must be reported on the page.

`LITEASR_SCREENSHOTS=docs pytest tests/test_page.py` also writes the screenshots of the README (docs/page.png,
docs/page-narrow.png).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from helpers import JFK, scrape, value, wait_until, words
from server import RunningServer, serve_model

from liteasr.audio import SAMPLE_RATE, load_audio

try:
    from playwright.sync_api import Browser, Page, WebSocketRoute, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

pytestmark = pytest.mark.real

CHROMIUM = Path("/usr/bin/chromium")
needs_browser = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.exists(),
    reason="needs Playwright (pip install -e '.[test]') and Debian's chromium at /usr/bin/chromium "
    "(apt-get install chromium); .ci/run installs both",
)
CLIP = "jfk"
TRANSCRIBE_TIMEOUT_MS = 120_000
PCM_RATE = 24_000


@pytest.fixture(scope="module")
def server(tiny_en_dir, tmp_path_factory) -> RunningServer:
    work = tmp_path_factory.mktemp("page")
    # float32: the page's streamed transcript is compared with a second, non-streamed decoding
    with serve_model(tiny_en_dir, work, LITEASR_MAX_BATCH_SIZE="4", LITEASR_INT8="off") as running:
        yield running


@pytest.fixture(scope="module")
def api(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def browser(clip_path, tmp_path_factory) -> Browser:
    # The fake microphone plays the clip (as 16-bit WAV, what Chromium's fake capture reads), looping.
    wav = tmp_path_factory.mktemp("browser") / f"{CLIP}.wav"
    sf.write(wav, load_audio(clip_path(CLIP)), SAMPLE_RATE, subtype="PCM_16")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",  # as root
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server) -> Page:
    context = browser.new_context(viewport={"width": 1000, "height": 900}, accept_downloads=True)
    page = context.new_page()
    foreign: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith((server.url, "blob:", "data:")) else foreign.append(r.url),
    )
    page.goto(f"{server.url}/")
    expect(page.get_by_test_id("status")).to_contain_text("Ready")
    yield page
    context.close()
    assert not foreign, f"the page asked other hosts: {foreign}"


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("LITEASR_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_the_page_and_its_assets_come_from_the_server_alone(api):
    response = api.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    for hook in ("file-input", "transcript", "record", "status"):
        assert f'data-testid="{hook}"' in html
    assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert sorted(assets) == [
        "static/page.css",
        "static/page.js",
        "static/pcm.js",
    ]  # relative: any path prefix
    texts = {"/": html}
    for asset in assets:
        got = api.get(f"/{asset}")
        assert got.status_code == 200, asset
        assert got.headers["cache-control"] == "no-cache"
        texts[asset] = got.text
    for name, text in texts.items():
        assert not re.search(r"\b(?:https?|wss?)://", text, re.IGNORECASE), name
        assert not re.search(r"""(?:src|href)\s*=\s*["']//""", text), name  # protocol-relative
    assert not re.search(r"@import|url\(", texts["static/page.css"]), "the stylesheet loads nothing"
    # The page's requests are counted by the request histogram (observed just after each response is sent).
    name = "liteasr_request_duration_seconds_count"
    wait_until(
        lambda: (
            value(samples := scrape(api), name, endpoint="/", status="200") >= 1
            and value(samples, name, endpoint="/static/{path:path}", status="200") >= len(assets)
        ),
        timeout=10,
        what="the page's requests in /metrics",
    )


@needs_browser
def test_a_chosen_file_streams_its_transcript_its_words_play_and_it_downloads(page, api, clip_path, tmp_path):
    audio = clip_path(CLIP).read_bytes()
    whole = api.post("/transcribe", files={"file": ("jfk.flac", audio)}, data={"timestamps": "word"}).json()
    srt = api.post("/transcribe", files={"file": ("jfk.flac", audio)}, data={"response_format": "srt"}).text
    # Every text the transcript shows, as it shows it.
    page.evaluate("""() => {
        const transcript = document.querySelector('[data-testid="transcript"]');
        window.shown = [];
        new MutationObserver(() => window.shown.push(transcript.textContent))
            .observe(transcript, {childList: true, characterData: true, subtree: true});
    }""")

    page.get_by_test_id("file-input").set_input_files(str(clip_path(CLIP)))
    status = page.get_by_test_id("status")
    expect(status).to_contain_text("Done", timeout=TRANSCRIBE_TIMEOUT_MS)
    transcript = page.get_by_test_id("transcript")
    assert transcript.text_content() == whole["text"]
    shown = [text for text in page.evaluate("window.shown") if text]
    assert len(set(shown)) > 3, shown  # it grew piece by piece
    assert all(whole["text"].startswith(text) for text in shown), shown
    expect(page.get_by_test_id("meta-language")).to_have_text("English (en)")
    expect(page.get_by_test_id("meta-duration")).to_have_text(f"{whole['duration']:.1f} s")
    expect(page.get_by_test_id("meta-processing")).to_contain_text(" s")

    buttons = page.get_by_test_id("words").locator(".word")
    assert buttons.all_text_contents() == [w["word"].strip() for w in whole["words"]]
    target = len(whole["words"]) // 2
    buttons.nth(target).click()
    assert_played_from(page, whole["words"][target]["start"])
    # The keyboard: arrows move between words, Enter plays.
    buttons.nth(target).focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    assert_played_from(page, whole["words"][target + 2]["start"])
    assert page.evaluate("document.activeElement.textContent") == whole["words"][target + 2]["word"].strip()

    with page.expect_download() as download:
        page.get_by_test_id("download-srt").click()
    assert download.value.suggested_filename == "jfk.srt"
    assert Path(download.value.path()).read_text() == srt
    with page.expect_download() as download:
        page.get_by_test_id("download-json").click()
    assert json.loads(Path(download.value.path()).read_text())["text"] == whole["text"]

    page.evaluate("document.querySelector('audio').pause()")
    page.mouse.move(0, 0)
    screenshot(page, "page.png")
    page.set_viewport_size({"width": 360, "height": 780})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    screenshot(page, "page-narrow.png")


def assert_played_from(page: Page, start: float) -> None:
    """The player has jumped to `start` and plays from there (it may have moved on a little since)."""
    page.wait_for_function(
        """start => { const a = document.querySelector('audio');
                      return !a.seeking && !a.paused
                          && a.currentTime >= start - 0.05 && a.currentTime < start + 1.5; }""",
        arg=start,
        timeout=10_000,
    )


@needs_browser
def test_a_file_dropped_on_the_page_is_transcribed(page, clip_path):
    encoded = base64.b64encode(clip_path(CLIP).read_bytes()).decode()
    dropped = page.evaluate_handle(
        """encoded => { const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
                        const transfer = new DataTransfer();
                        transfer.items.add(new File([bytes], 'dropped.flac', {type: 'audio/flac'}));
                        return transfer; }""",
        encoded,
    )
    page.get_by_test_id("dropzone").dispatch_event("drop", {"dataTransfer": dropped})
    expect(page.get_by_test_id("status")).to_contain_text("Done", timeout=TRANSCRIBE_TIMEOUT_MS)
    assert words(page.get_by_test_id("transcript").text_content()) == words(JFK)
    expect(page.get_by_test_id("download-txt")).to_have_attribute("download", "dropped.txt")


@needs_browser
def test_a_file_the_server_refuses_is_reported_in_the_status(page):
    page.get_by_test_id("file-input").set_input_files(
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not audio at all\n" * 10}
    )
    status = page.get_by_test_id("status")
    expect(status).to_contain_text("Could not transcribe notes.txt:", timeout=30_000)
    expect(status).to_have_attribute("data-state", "error")
    expect(page.get_by_test_id("transcript")).to_have_text("")


@needs_browser
def test_record_says_so_when_the_realtime_websocket_is_refused(page):
    # A server at its realtime session limit refuses the handshake; the page must not fail silently.
    page.route_web_socket(re.compile(r"/v1/realtime"), lambda ws: ws.close(code=1013, reason="busy"))
    record = page.get_by_test_id("record")
    record.click()
    status = page.get_by_test_id("status")
    expect(status).to_contain_text("Live captions are not available", timeout=15_000)
    expect(status).to_have_attribute("data-state", "error")
    expect(record).to_have_attribute("aria-pressed", "false")
    expect(record).to_be_enabled()


@needs_browser
def test_record_shows_live_captions_from_the_real_server(page):
    """The fake microphone plays the clip; the real /v1/realtime cuts it into turns and the captions show."""
    record = page.get_by_test_id("record")
    record.click()
    expect(record).to_have_attribute("aria-pressed", "true", timeout=15_000)
    transcript = page.get_by_test_id("transcript")
    expect(transcript).to_contain_text(re.compile("fellow", re.IGNORECASE), timeout=40_000)
    expect(transcript).to_contain_text(re.compile("your country", re.IGNORECASE), timeout=40_000)
    screenshot(page, "page-recording.png")
    record.click()
    expect(record).to_have_attribute("aria-pressed", "false", timeout=20_000)


class FakeRealtime:
    """Answers as OpenAI's Realtime transcription API would: a turn with deltas once a second of audio has
    come, its completion after three seconds, an `error` event after five, a last turn after the commit."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict]] = []
        self.appends = 0

    def __call__(self, ws: WebSocketRoute) -> None:
        self.ws = ws
        ws.on_message(self.on_message)
        self.send("session.created", session={"type": "transcription"})

    def send(self, type_: str, **fields) -> None:
        self.ws.send(json.dumps({"type": type_, "event_id": f"event_{len(self.received)}", **fields}))

    def on_message(self, message: str | bytes) -> None:
        event = json.loads(message)
        self.received.append((time.monotonic(), event))
        if event["type"] == "session.update":
            self.send("session.updated", session=event["session"])
        elif event["type"] == "input_audio_buffer.append":
            self.appends += 1
            if self.appends == 10:
                self.send("input_audio_buffer.speech_started", audio_start_ms=300, item_id="item_1")
                for delta in ("And so", " my fellow"):
                    self.transcript("delta", "item_1", delta=delta)
            elif self.appends == 30:
                self.send("input_audio_buffer.speech_stopped", audio_end_ms=2900, item_id="item_1")
                self.send("input_audio_buffer.committed", item_id="item_1", previous_item_id=None)
                self.transcript("completed", "item_1", transcript="And so my fellow Americans.")
            elif self.appends == 50:
                self.send(
                    "error", error={"type": "invalid_request_error", "code": "x", "message": "a test error"}
                )
        elif event["type"] == "input_audio_buffer.commit":
            self.send("input_audio_buffer.committed", item_id="item_2", previous_item_id="item_1")
            self.transcript("delta", "item_2", delta="Ask not")
            self.transcript("completed", "item_2", transcript="Ask not.")

    def transcript(self, kind: str, item_id: str, **fields) -> None:
        self.send(
            f"conversation.item.input_audio_transcription.{kind}", item_id=item_id, content_index=0, **fields
        )

    def audio(self) -> tuple[np.ndarray, float]:
        """The appended audio (float) and the seconds from the first append to the last."""
        appends = [(at, e) for at, e in self.received if e["type"] == "input_audio_buffer.append"]
        pcm = b"".join(base64.b64decode(e["audio"]) for _, e in appends)
        assert len(pcm) % 2 == 0
        return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, appends[-1][0] - appends[0][0]


# Without AudioWorklet the page falls back to a ScriptProcessorNode with the same resampler.
NO_AUDIO_WORKLET = (
    "delete window.AudioWorkletNode;"
    "Object.defineProperty(BaseAudioContext.prototype, 'audioWorklet', {get: () => undefined});"
)


@needs_browser
@pytest.mark.parametrize("capture", ["audio-worklet", "script-processor"])
def test_record_speaks_the_realtime_protocol_and_shows_captions(browser, server, api, capture):
    context = browser.new_context()
    if capture == "script-processor":
        context.add_init_script(NO_AUDIO_WORKLET)
    page = context.new_page()
    fake = FakeRealtime()
    page.route_web_socket(re.compile(r"^ws://[^/]+/v1/realtime\?intent=transcription&partials=true$"), fake)
    page.goto(f"{server.url}/")
    expect(page.get_by_test_id("status")).to_contain_text("Ready")
    record, status, transcript = (page.get_by_test_id(k) for k in ("record", "status", "transcript"))

    record.click()
    expect(record).to_have_attribute("aria-pressed", "true", timeout=15_000)
    expect(transcript).to_contain_text(
        "And so my fellow", timeout=15_000
    )  # deltas, before the turn completes
    expect(transcript.locator(".caption.final")).to_have_text("And so my fellow Americans.", timeout=15_000)
    expect(status).to_contain_text("Live captions: a test error", timeout=15_000)  # and the session goes on
    record.click()  # stop
    expect(status).to_have_text("Recording stopped.", timeout=15_000)
    expect(record).to_have_attribute("aria-pressed", "false")
    expect(transcript).to_have_text("And so my fellow Americans. Ask not. ")
    context.close()

    types = [e["type"] for _, e in fake.received]
    assert types[0] == "session.update" and types[-1] == "input_audio_buffer.commit"
    assert set(types[1:-1]) == {"input_audio_buffer.append"}
    session = fake.received[0][1]["session"]
    assert session["type"] == "transcription"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": PCM_RATE}
    # The PCM comes at 24 kHz (within timer jitter) and is the clip: the real server transcribes it.
    audio, seconds = fake.audio()
    assert 0.8 < len(audio) / PCM_RATE / seconds < 1.25, (len(audio), seconds)
    wav = io.BytesIO()
    sf.write(wav, audio, PCM_RATE, format="WAV", subtype="PCM_16")
    heard = api.post("/transcribe", files={"file": ("mic.wav", wav.getvalue())}).json()["text"]
    # Its first words only: Chromium's echo cancellation and noise suppression process the fake microphone too
    # ("America asked not"), and PCM at a wrong rate or byte order would give nothing like them.
    assert words(heard).startswith("and so my fellow"), heard
