"""Same answers: the step engine against the `generate` engine it replaced, window by window (not a test: minutes).

For each model and split, every window of every clip is decoded by both (float32, the loop guard on, 8 rows / static
batches of 8): the share of windows with exactly the same tokens, and the WER of each. Fallback rows are sampled
differently (the step engine gives each row its own generator; `generate` sampled the whole batch with one seed),
so windows that needed a fallback may differ; greedy ones must not.

    .venv/bin/python bench/engine_equivalence.py [--models models/whisper-tiny.en] [--splits dev,long]
                                                 [--json out/bench/engine_equivalence.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from split_windows import SplitWindows  # noqa: E402  (bench/, this script's folder)


def compare(model: Path, split: str) -> dict:
    from reference_engine import GenerateReference

    from liteasr.decoding import DecodeOptions
    from liteasr.engine import Engine

    engine = Engine.load(model, device="cpu")
    reference = GenerateReference(engine)
    split_windows = SplitWindows.load(split)
    windows = split_windows.samples
    options = [DecodeOptions()] * len(windows)
    started = time.perf_counter()
    new = engine.transcribe_windows(windows, options, batch_size=8)
    new_s = time.perf_counter() - started
    started = time.perf_counter()
    old = []
    for i in range(0, len(windows), 8):
        old += reference.transcribe_windows(windows[i : i + 8], options[i : i + 8])
    old_s = time.perf_counter() - started
    same = sum(a.tokens == b.tokens for a, b in zip(new, old, strict=True))
    differing_fallbacks = sum(
        a.tokens != b.tokens and (a.looped or b.looped) for a, b in zip(new, old, strict=True)
    )
    return {
        "model": model.name,
        "split": split,
        "clips": len(split_windows.references),
        "windows": len(windows),
        "same_tokens": same,
        "same_share": same / len(windows),
        "differing_after_a_fallback": differing_fallbacks,
        "wer_step_engine": split_windows.wer(new),
        "wer_generate": split_windows.wer(old),
        "seconds_step_engine": new_s,
        "seconds_generate": old_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=str(REPO / "models" / "whisper-tiny.en"), help="comma-separated")
    parser.add_argument("--splits", default="dev,long")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "bench" / "engine_equivalence.json")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    for model in args.models.split(","):
        for split in args.splits.split(","):
            row = compare(Path(model), split)
            rows.append(row)
            print(
                f"{row['model']} {split}: {row['same_tokens']}/{row['windows']} windows with the same tokens "
                f"({100 * row['same_share']:.1f}%; {row['differing_after_a_fallback']} of the others after a "
                f"fallback), WER {100 * row['wer_step_engine']:.2f}% vs {100 * row['wer_generate']:.2f}%, "
                f"{row['seconds_step_engine']:.1f} s vs {row['seconds_generate']:.1f} s",
                flush=True,
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
