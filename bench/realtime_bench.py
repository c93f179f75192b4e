"""Live captions under load: realtime sessions streaming at real-time pace while uploads run, through the server.

    .venv/bin/python bench/realtime_bench.py [--model models/whisper-tiny.en] [--sessions 4] [--output FILE]

Each session streams the same speech (dev clips of several voices, 1.2 s of silence after each) as 24 kHz PCM16 in
100 ms events at real-time pace, with the server's default turn detection (server VAD, 500 ms of silence). Caption
latency: from the moment the end of a turn's speech was sent (`speech_stopped`'s `audio_end_ms` on the session's
clock) to the `completed` event. Accuracy: WER of each session's joined transcripts against the references,
beside the WER of the same audio uploaded whole to `POST /transcribe`. Meanwhile one client uploads dev clips in a
loop.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import soxr
from machine import describe, summary  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server import serve  # noqa: E402

from liteasr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from liteasr.evaluate import wer_scores  # noqa: E402

MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"
RATE, CHUNK = 24000, 0.1


def session(url: str, pcm: bytes, out: dict) -> None:
    from websockets.sync.client import connect

    with connect(url, open_timeout=30, max_size=None) as ws:
        ws.recv(timeout=30)
        started, stops, done, latencies = time.monotonic(), {}, [], []
        commits, decode_times = {}, []
        size = int(RATE * CHUNK) * 2

        sent = threading.Event()

        def reader() -> (
            None
        ):  # reads everything, so the client never stops reading the socket (and its pongs)
            quiet_since = None
            while True:
                try:
                    event = json.loads(ws.recv(timeout=1.0))
                except TimeoutError:
                    if sent.is_set() and len(done) == len(stops):
                        quiet_since = quiet_since or time.monotonic()
                        if time.monotonic() - quiet_since > 3.0:
                            return
                    continue
                except Exception:
                    return
                quiet_since = None
                if event["type"] == "input_audio_buffer.speech_stopped":
                    stops[event["item_id"]] = started + event["audio_end_ms"] / 1000
                elif event["type"] == "input_audio_buffer.committed":
                    commits[event["item_id"]] = time.monotonic()
                elif event["type"].endswith("transcription.completed"):
                    done.append(event["transcript"])
                    latencies.append(time.monotonic() - stops.get(event["item_id"], time.monotonic()))
                    decode_times.append(time.monotonic() - commits.get(event["item_id"], time.monotonic()))

        thread = threading.Thread(target=reader)
        thread.start()
        for index, offset in enumerate(range(0, len(pcm), size)):
            chunk = base64.b64encode(pcm[offset : offset + size]).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            time.sleep(max(0.0, started + (index + 1) * CHUNK - time.monotonic()))
        sent.set()
        thread.join()
    out.update(transcript=" ".join(done), latencies=latencies, decode_times=decode_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/whisper-tiny.en")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    dev = [r for r in rows if r["split"] == "dev" and r["duration"] >= 2.0]
    clips = dev[:: max(1, len(dev) // args.clips)][: args.clips]
    gap = np.zeros(int(1.2 * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate(
        [piece for r in clips for piece in (load_audio(MANIFEST.parent / r["audio"]), gap)]
    )
    reference = " ".join(r["text"] for r in clips)
    pcm = (np.clip(soxr.resample(audio, SAMPLE_RATE, RATE), -1, 1) * 32767).astype("<i2").tobytes()
    flac = io.BytesIO()
    sf.write(flac, audio, SAMPLE_RATE, format="FLAC")

    with tempfile.TemporaryDirectory() as work:
        settings = {"LITEASR_MODEL": str(Path(args.model).resolve()), "LITEASR_MAX_BATCH_SIZE": "8"}
        with serve(settings, Path(work) / "server.log") as server:
            upload = httpx.post(
                f"{server.url}/transcribe", files={"file": ("all.flac", flac.getvalue())}, timeout=600
            ).json()["text"]
            stop, uploads = threading.Event(), []

            def uploader() -> None:
                with httpx.Client(base_url=server.url, timeout=600) as client:
                    while not stop.is_set():
                        for r in clips:
                            started = time.monotonic()
                            data = (MANIFEST.parent / r["audio"]).read_bytes()
                            client.post("/transcribe", files={"file": ("c.flac", data)})
                            uploads.append(time.monotonic() - started)

            load = threading.Thread(target=uploader)
            load.start()
            url = server.url.replace("http", "ws") + "/v1/realtime?intent=transcription"
            results = [{} for _ in range(args.sessions)]
            threads = [threading.Thread(target=session, args=(url, pcm, out)) for out in results]
            for thread in threads:  # staggered, as people do not start speaking in the same 100 ms
                thread.start()
                time.sleep(0.77)
            for thread in threads:
                thread.join()
            stop.set()
            load.join()
            log = (Path(work) / "server.log").read_text()
            if "Traceback" in log:
                print(log[-6000:])

    latencies = np.array([x for r in results for x in r["latencies"]])
    decode_times = np.array([x for r in results for x in r["decode_times"]])
    upload_wer = wer_scores([reference], [upload]).corpus_wer * 100
    session_wers = [wer_scores([reference], [r["transcript"]]).corpus_wer * 100 for r in results]
    lines = [
        "# Live captions under load",
        "",
        f"Command: `.venv/bin/python bench/realtime_bench.py --model {args.model} --sessions {args.sessions}`",
        "",
        f"Machine: {summary(describe('onnxruntime', 'silero_vad'))}; model {Path(args.model).name}, "
        "server defaults (int8 decoder, VAD on, LITEASR_MAX_BATCH_SIZE=8), one run.",
        f"Audio: {len(clips)} dev clips of {len({r['speaker'] for r in clips})} voices, 1.2 s of silence after "
        f"each, {len(audio) / SAMPLE_RATE:.1f} s, streamed by {args.sessions} sessions at once (started 0.77 s "
        "apart) at real-time pace "
        f"while one client uploaded dev clips in a loop ({len(uploads)} uploads, median "
        f"{np.median(uploads):.2f} s each).",
        "",
        f"- Caption latency (end of speech sent -> completed), {len(latencies)} turns: p50 "
        f"{np.median(latencies):.2f} s, p90 {np.percentile(latencies, 90):.2f} s, max {latencies.max():.2f} s. "
        f"Of it, from the commit to completed (the turn's transcription, queued behind the others): p50 "
        f"{np.median(decode_times):.2f} s, p90 {np.percentile(decode_times, 90):.2f} s; the rest is the server "
        "waiting for `silence_duration_ms` of silence after the speech (500 ms; `audio_end_ms` is the end of the "
        "speech).",
        f"- WER of the same audio uploaded whole: {upload_wer:.1f}%; of each session's turns: "
        + ", ".join(f"{w:.1f}%" for w in session_wers)
        + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
