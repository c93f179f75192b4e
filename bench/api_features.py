"""The API features measured through the real server (`python -m app`, real HTTP, the `openai` client).

    .venv/bin/python bench/api_features.py [--model models/whisper-tiny.en] [--output docs/api-figures.md]

1. Streaming: on a 73 s clip (three windows), when the first delta and the done event arrive, against the
   non-streamed answer; whether the deltas join to the done text and to the non-streamed text.
2. Word timing on spliced audio (clip A, 2.0 s of silence, clip B): where B's first word starts against where B's
   speech starts.
3. A prompt with a rare spelling: the text without and with it.
4. No-speech inputs (silence, noise, tones, music, hum): words with the default VAD and with
   `chunking_strategy=none`; the time of each.
The server runs with its defaults (int8 decoder on the CPU, VAD on), `LITEASR_MAX_BATCH_SIZE=8`.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from machine import describe, summary  # bench/machine.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server import serve  # noqa: E402
from signals import no_speech  # noqa: E402

from liteasr.audio import SAMPLE_RATE, load_audio  # noqa: E402

SPEECH = REPO / "data" / "speech" / "audio"


def flac(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def speech_onset(audio: np.ndarray) -> float:
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    level = np.sqrt(np.square(frames).mean(axis=1))
    return int(np.argmax(level > 0.1 * level.max())) * 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/whisper-tiny.en")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    import openai

    lines: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        settings = {"LITEASR_MODEL": str(Path(args.model).resolve()), "LITEASR_MAX_BATCH_SIZE": "8"}
        with serve(settings, Path(work) / "server.log") as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600, max_retries=0)
            long_clip = flac(load_audio(SPEECH / "asterisk_demo-instruct.flac"))

            started = time.monotonic()
            whole = client.audio.transcriptions.create(model="m", file=("long.flac", long_clip)).text
            whole_s = time.monotonic() - started
            started = time.monotonic()
            first_s, pieces, done = None, [], None
            for event in client.audio.transcriptions.create(
                model="m", file=("long.flac", long_clip), stream=True
            ):
                if event.type == "transcript.text.delta":
                    first_s = first_s if first_s is not None else time.monotonic() - started
                    pieces.append(event.delta)
                else:
                    done = event
            stream_s = time.monotonic() - started
            lines += [
                "## 1. Streaming (73 s clip, three windows)",
                "",
                f"- Non-streamed answer: {whole_s:.2f} s.",
                f"- Streamed: first delta after {first_s:.2f} s, done after {stream_s:.2f} s, {len(pieces)} deltas.",
                f"- Deltas joined == done text: {''.join(pieces) == done.text}; done text == non-streamed text: "
                f"{done.text == whole}.",
                "",
            ]

            a = load_audio(SPEECH / "asterisk_check-number-dial-again.flac")
            b = load_audio(SPEECH / "asterisk_conf-enteringno.flac")
            gap = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
            truth = (len(a) + len(gap)) / SAMPLE_RATE + speech_onset(b)
            answer = client.audio.transcriptions.create(
                model="m",
                file=("spliced.flac", flac(np.concatenate([a, gap, b]))),
                response_format="verbose_json",
                timestamp_granularities=["word"],
            )
            b_first = next(w for w in answer.words if w.word.strip().lower() == "you")
            lines += [
                "## 2. Word timing on spliced audio (A, 2.0 s of silence, B)",
                "",
                f"- B's speech starts at {truth:.2f} s; its first word (`{b_first.word.strip()}`) is given "
                f"{b_first.start:.2f}-{b_first.end:.2f} s: {abs(b_first.start - truth):.2f} s off.",
                "- Words: " + " ".join(f"`{w.word.strip()}` {w.start:.2f}" for w in answer.words),
                "",
            ]

            clip = ("vm.flac", flac(load_audio(SPEECH / "asterisk_vm-intro.flac")))
            prompt = "When done, hang-up or press the Pound-Key."
            plain = client.audio.transcriptions.create(model="m", file=clip).text
            prompted = client.audio.transcriptions.create(model="m", file=clip, prompt=prompt).text
            lines += [
                "## 3. A prompt with a rare spelling",
                "",
                f"- Without: {plain!r}",
                f"- With `prompt={prompt!r}`: {prompted!r}",
                "",
                "## 4. No-speech inputs",
                "",
                "| input | words with VAD (default) | time (s) | words with `chunking_strategy=none` | time (s) |",
                "|---|---|---|---|---|",
            ]
            totals = [0, 0]
            with httpx.Client(base_url=server.url, timeout=600) as http:
                for name, audio in no_speech().items():
                    row = [name]
                    for index, strategy in enumerate(("auto", "none")):
                        started = time.monotonic()
                        response = http.post(
                            "/transcribe",
                            files={"file": ("x.flac", flac(audio))},
                            data={"chunking_strategy": strategy},
                        )
                        seconds = time.monotonic() - started
                        count = len(response.json()["text"].split())
                        totals[index] += count
                        row += [str(count), f"{seconds:.2f}"]
                    lines.append("| " + " | ".join(row) + " |")
            lines += ["", f"Words in all: {totals[0]} with VAD, {totals[1]} without.", ""]

    header = [
        "# API features, measured through the server",
        "",
        f"Command: `.venv/bin/python bench/api_features.py --model {args.model}"
        + (f" --output {args.output}`" if args.output else "`"),
        "",
        f"Machine: {summary(describe('onnxruntime', 'silero_vad'))}; model {Path(args.model).name}, server "
        "defaults (int8 decoder, VAD on), one run.",
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
