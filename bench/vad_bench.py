"""VAD benchmark (not a test, minutes of CPU): what Silero VAD in front of Whisper buys, and what it costs.

On Whisper tiny.en (`Engine.transcribe_windows`, then `liteasr.decoding.stitch`), each audio decoded twice: without
VAD (energy windows, `liteasr.audio.split_windows`, what `Engine.transcribe` does) and with it
(`liteasr.vad.vad_windows`: only speech, packed in windows of at most 30 s of original audio):

1. no-speech inputs (tests/signals.py: silence, white and pink noise, tones, synthetic music, mains hum; 10-60 s):
   words output (with VAD it must be 0);
2. WER (`liteasr.evaluate.wer_scores`, Whisper's English normalizer) on the `long` split (3 clips, 30-73 s) and
   the `dev` split (116 clips) of data/speech/manifest.jsonl: it must not be worse with VAD; on `long`, also for
   every VadOptions of a one-knob-at-a-time sweep, which is how the defaults were chosen;
3. speed on audio with long pauses: dev clips spliced with 5-20 s of silence, or of pink noise, between them: wall
   time with and without VAD (VAD's own time included), best of `--repeats`, the two alternated;
4. VAD's own cost: milliseconds per audio second of the sequence model this module runs and of Silero's streaming
   `OnnxWrapper`, and the throughput of two threads sharing one detector.

It writes its results between the `vad:begin` / `vad:end` markers of the output Markdown (the text outside them is
kept) and the raw figures as JSON (`--json`).

    .venv/bin/python bench/vad_bench.py [--model models/whisper-tiny.en] [--int8 decoder] [--no-sweep]
                                        [--output docs/vad.md] [--json out/vad/vad_bench.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from machine import describe  # bench/machine.py (this script's folder is on the path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from signals import no_speech, pink_noise  # noqa: E402

from liteasr.audio import SAMPLE_RATE, load_audio, split_windows  # noqa: E402
from liteasr.decoding import DecodeOptions, stitch  # noqa: E402
from liteasr.evaluate import normalize_text, wer_scores  # noqa: E402
from liteasr.manifest import read_manifest  # noqa: E402
from liteasr.vad import VadOptions, VoiceActivityDetector, vad_windows  # noqa: E402

MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"
BEGIN, END = "<!-- vad:begin -->", "<!-- vad:end -->"
DEFAULT = VadOptions()
# One knob at a time around the defaults.
SWEEP = [
    DEFAULT,
    replace(DEFAULT, threshold=0.35),
    replace(DEFAULT, threshold=0.65),
    replace(DEFAULT, prefix_padding_ms=100),
    replace(DEFAULT, prefix_padding_ms=500),
    replace(DEFAULT, silence_duration_ms=200),
    replace(DEFAULT, silence_duration_ms=1000),
    replace(DEFAULT, silence_duration_ms=2000),
]


def transcribe(engine, audios: list[np.ndarray], windowing) -> tuple[list[str], list[int], float]:
    """Texts of `audios`, each cut by `windowing(audio) -> windows` (an audio without windows says nothing), the
    window count of each, and the seconds of audio decoded."""
    all_windows = [windowing(audio) for audio in audios]
    flat = [w.samples for windows in all_windows for w in windows]
    results = engine.transcribe_windows(flat, [DecodeOptions()] * len(flat), batch_size=8) if flat else []
    texts, position = [], 0
    for audio, windows in zip(audios, all_windows, strict=True):
        if windows:
            part = results[position : position + len(windows)]
            texts.append(stitch(windows, part, len(audio) / SAMPLE_RATE).text)
        else:
            texts.append("")
        position += len(windows)
    return texts, [len(w) for w in all_windows], sum(map(len, flat)) / SAMPLE_RATE


def energy_windows(audio: np.ndarray):
    return split_windows(audio)


def words(text: str) -> int:
    return len(normalize_text(text).split())


def no_speech_section(engine, detector) -> list[dict]:
    rows = []
    for name, audio in no_speech().items():
        plain, plain_windows, _ = transcribe(engine, [audio], energy_windows)
        vad, vad_count, _ = transcribe(engine, [audio], lambda a: vad_windows(a, detector))
        rows.append(
            {
                "input": name,
                "windows": plain_windows[0],
                "words": words(plain[0]),
                "text": plain[0][:80],
                "vad_windows": vad_count[0],
                "vad_words": words(vad[0]),
            }
        )
        print(f"  {name}: {rows[-1]}", flush=True)
    return rows


def wer_section(engine, detector, sweep: list[VadOptions]) -> list[dict]:
    rows = []
    for split in ("long", "dev"):
        clips = read_manifest(MANIFEST, split=split)
        audios = [load_audio(clip.audio) for clip in clips]
        refs = [clip.text for clip in clips]
        seconds = sum(map(len, audios)) / SAMPLE_RATE
        # The sweep on the long split only (what the knobs change most: its pauses); dev gets the defaults.
        options_list = sweep if split == "long" else [DEFAULT]
        configs = [("no VAD", None), *((f"VAD {_label(o)}", o) for o in options_list)]
        for label, options in configs:
            if options is None:
                windowing = energy_windows
            else:

                def windowing(audio, options=options):
                    return vad_windows(audio, detector, options)

            started = time.perf_counter()
            texts, counts, decoded = transcribe(engine, audios, windowing)
            elapsed = time.perf_counter() - started
            scores = wer_scores(refs, texts)
            rows.append(
                {
                    "split": split,
                    "clips": len(clips),
                    "audio_s": seconds,
                    "config": label,
                    "options": None if options is None else asdict(options),
                    "wer": scores.corpus_wer,
                    "mean_utterance_wer": scores.mean_utterance_wer,
                    "windows": sum(counts),
                    "decoded_s": decoded,
                    "empty": sum(not t.strip() for t in texts),
                    "wall_s": elapsed,
                }
            )
            print(f"  {split} {label}: WER {100 * scores.corpus_wer:.2f}% windows {sum(counts)}", flush=True)
    return rows


def _label(options: VadOptions) -> str:
    return (
        f"threshold {options.threshold:g}, padding {options.prefix_padding_ms} ms, "
        f"silence {options.silence_duration_ms} ms, min speech {options.min_speech_duration_ms} ms"
    )


def paused_audio(filler: str, seed: int = 0) -> tuple[np.ndarray, str]:
    """Ten dev clips (not the dominant voice first: every fourth) with 5-20 s of `filler` between them."""
    rng = np.random.default_rng(seed)
    clips = read_manifest(MANIFEST, split="dev")[::4][:10]
    pieces, texts = [], []
    for i, clip in enumerate(clips):
        if i:
            seconds = float(rng.uniform(5, 20))
            if filler == "silence":
                pieces.append(np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32))
            else:
                pieces.append(pink_noise(seconds, rng, level=0.02))
        pieces.append(load_audio(clip.audio))
        texts.append(clip.text)
    return np.concatenate(pieces), " ".join(texts)


def speed_section(engine, detector, repeats: int) -> list[dict]:
    rows = []
    for filler in ("silence", "pink noise"):
        audio, reference = paused_audio(filler)
        seconds = len(audio) / SAMPLE_RATE
        best = {"no VAD": float("inf"), "VAD": float("inf")}
        out = {}
        for _ in range(repeats):
            for label in best:
                started = time.perf_counter()
                if label == "VAD":
                    texts, counts, _ = transcribe(engine, [audio], lambda a: vad_windows(a, detector))
                else:
                    texts, counts, _ = transcribe(engine, [audio], energy_windows)
                best[label] = min(best[label], time.perf_counter() - started)
                out[label] = (texts[0], counts[0])
        started = time.perf_counter()
        spans = detector.speech(audio)
        vad_s = time.perf_counter() - started
        row = {
            "filler": filler,
            "audio_s": seconds,
            "speech_s": sum(e - s for s, e in spans) / SAMPLE_RATE,
            "vad_s": vad_s,
            "plain_s": best["no VAD"],
            "vad_total_s": best["VAD"],
            "speedup": best["no VAD"] / best["VAD"],
            "plain_windows": out["no VAD"][1],
            "vad_windows": out["VAD"][1],
            "plain_wer": wer_scores([reference], [out["no VAD"][0]]).corpus_wer,
            "vad_wer": wer_scores([reference], [out["VAD"][0]]).corpus_wer,
        }
        rows.append(row)
        print(f"  {filler}: {row}", flush=True)
    return rows


def vad_cost_section(detector) -> dict:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    audio = load_audio(next(c.audio for c in read_manifest(MANIFEST, split="long") if c.duration > 60))
    seconds = len(audio) / SAMPLE_RATE
    threads = torch.get_num_threads()
    stock = load_silero_vad(onnx=True)
    torch.set_num_threads(threads)  # silero_vad's import set it to 1

    def best(fn, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    sequence_s = best(lambda: detector.speech(audio))
    stock_s = best(lambda: get_speech_timestamps(torch.from_numpy(audio), stock, speech_pad_ms=300))
    same = (
        detector.probabilities(audio).tolist()
        == stock.audio_forward(torch.from_numpy(audio), 16000)[0].tolist()
    )

    def two_threads() -> None:
        workers = [threading.Thread(target=detector.speech, args=(audio,)) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    two_s = best(two_threads)
    return {
        "audio_s": seconds,
        "sequence_ms_per_s": 1000 * sequence_s / seconds,
        "stock_ms_per_s": 1000 * stock_s / seconds,
        "same_probabilities": same,
        "two_threads_ms_per_s": 1000 * two_s / (2 * seconds),
    }


def render(report: dict) -> str:
    m = report["machine"]
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    lines = [
        BEGIN,
        "",
        "## Results (written by `bench/vad_bench.py`)",
        "",
        f"- Command: `{report['command']}`",
        f"- Started {report['started']} UTC, took {report['elapsed_s'] / 60:.1f} min.",
        f"- Machine: {m['cpu']}, {m['cores']} cores (shared), torch {m['torch']} on {m['torch_threads']} threads, "
        f"onnxruntime {m['onnxruntime']} (1 thread), silero-vad {m['silero_vad']}; model {report['model']}.",
        "",
        "### 1. No-speech inputs: words output",
        "",
        "| input | windows, no VAD | words, no VAD | text, no VAD | windows, VAD | words, VAD |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["no_speech"]:
        text = r["text"].replace("|", "/") or "(none)"
        lines.append(
            f"| {r['input']} | {r['windows']} | {r['words']} | {text} | {r['vad_windows']} | {r['vad_words']} |"
        )
    total = sum(r["words"] for r in report["no_speech"])
    total_vad = sum(r["vad_words"] for r in report["no_speech"])
    lines += [f"| **all** | | **{total}** | | | **{total_vad}** |", ""]
    lines += [
        "### 2. WER (corpus, Whisper normalizer), without VAD and with each VadOptions",
        "",
        "| split | config | WER | mean utt. WER | windows | audio decoded | empty answers | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["wer"]:
        lines.append(
            f"| {r['split']} ({r['clips']} clips, {r['audio_s']:.0f} s) | {r['config']} | {pct(r['wer'])} | "
            f"{pct(r['mean_utterance_wer'])} | {r['windows']} | {r['decoded_s']:.0f} s | {r['empty']} | "
            f"{r['wall_s']:.1f} s |"
        )
    lines += [
        "",
        "### 3. Audio with long pauses: 10 dev clips, 5-20 s of filler between them (best of "
        f"{report['repeats']})",
        "",
        "| filler | audio | speech found | windows no VAD / VAD | wall no VAD | wall VAD (VAD itself) | speed-up "
        "| WER no VAD / VAD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["speed"]:
        lines.append(
            f"| {r['filler']} | {r['audio_s']:.0f} s | {r['speech_s']:.0f} s | {r['plain_windows']} / "
            f"{r['vad_windows']} | {r['plain_s']:.2f} s | {r['vad_total_s']:.2f} s ({r['vad_s']:.2f} s) | "
            f"**{r['speedup']:.2f}x** | {pct(r['plain_wer'])} / {pct(r['vad_wer'])} |"
        )
    c = report["vad_cost"]
    lines += [
        "",
        f"### 4. VAD's own cost ({c['audio_s']:.0f} s clip, best of 3)",
        "",
        f"- sequence model (`liteasr.vad`): **{c['sequence_ms_per_s']:.2f} ms per audio second** "
        f"({1000 / c['sequence_ms_per_s']:.0f}x real time on one thread);",
        f"- Silero's streaming `OnnxWrapper` + `get_speech_timestamps`: {c['stock_ms_per_s']:.2f} ms per audio "
        f"second; same per-frame probabilities as the sequence model: {c['same_probabilities']};",
        f"- two threads sharing one detector: {c['two_threads_ms_per_s']:.2f} ms per audio second each "
        "(wall time / audio seconds of both).",
        "",
        END,
    ]
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    """Replace the marked block of `path`, keeping the rest; a new file gets a title and the block."""
    if path.is_file():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Voice activity detection\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/whisper-tiny.en")
    parser.add_argument("--int8", default="decoder", help="decoder, all or off")
    parser.add_argument(
        "--no-sweep", action="store_true", help="only the default VadOptions on the long split"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "vad.md")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "vad" / "vad_bench.json")
    args = parser.parse_args(argv)

    from liteasr.engine import Engine

    started = time.perf_counter()
    engine = Engine.load(args.model, int8=None if args.int8 == "off" else args.int8, name="tiny.en")
    engine.warmup()
    detector = VoiceActivityDetector()
    report = {
        "command": "python bench/vad_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": describe("onnxruntime", "silero_vad"),
        "model": f"{engine.name} ({engine.info.quantization or engine.info.dtype}, {engine.info.device})",
        "repeats": args.repeats,
    }
    print("VAD cost", flush=True)
    report["vad_cost"] = vad_cost_section(detector)
    print("no-speech inputs", flush=True)
    report["no_speech"] = no_speech_section(engine, detector)
    print("WER", flush=True)
    report["wer"] = wer_section(engine, detector, [DEFAULT] if args.no_sweep else SWEEP)
    print("speed", flush=True)
    report["speed"] = speed_section(engine, detector, args.repeats)
    report["elapsed_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    write_markdown(args.output, render(report))
    print(f"wrote {args.output} and {args.json}")


if __name__ == "__main__":
    main()
