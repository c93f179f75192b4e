"""Does a window's text depend on what shares its decode steps? (Not a test: minutes.)

Every window of the chosen splits is decoded twice by the same engine: alone (one decoder row) and with the other
windows (8 rows, continuous batching), and the tokens are compared window by window. In float32 a row's numbers do
not depend on its step-mates, up to the rounding of matrix products of other shapes. With `--int8 decoder`, torch's
dynamic quantization picks one activation scale per call for all the rows of a step, so a step-mate with larger
activations coarsens a row's rounding: this measures how often that changes a window's tokens, and what it does to
WER.

    .venv/bin/python bench/batch_invariance.py [--model models/whisper-tiny.en] [--splits dev,long]
                                               [--int8 off,decoder] [--json out/bench/batch_invariance.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from split_windows import REPO, SplitWindows  # bench/, this script's folder


def compare(model: Path, split: str, int8: str | None, rows: int) -> dict:
    from liteasr.decoding import DecodeOptions
    from liteasr.engine import Engine

    engine = Engine.load(model, device="cpu", int8=int8, bf16="off")
    split_windows = SplitWindows.load(split)
    windows, keys = split_windows.samples, split_windows.keys
    options = [DecodeOptions()] * len(windows)
    started = time.perf_counter()
    alone = engine.transcribe_windows(windows, options, batch_size=1, keys=keys)
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    shared = engine.transcribe_windows(windows, options, batch_size=rows, keys=keys)
    shared_s = time.perf_counter() - started
    differing = [i for i, (a, b) in enumerate(zip(alone, shared, strict=True)) if a.tokens != b.tokens]
    return {
        "model": model.name,
        "split": split,
        "int8": int8 or "off",
        "rows": rows,
        "windows": len(windows),
        "same_tokens": len(windows) - len(differing),
        "differing_after_a_fallback": sum(alone[i].looped or shared[i].looped for i in differing),
        "wer_alone": split_windows.wer(alone),
        "wer_shared": split_windows.wer(shared),
        "seconds_alone": alone_s,
        "seconds_shared": shared_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "whisper-tiny.en")
    parser.add_argument("--splits", default="dev,long")
    parser.add_argument("--int8", default="off,decoder", help="comma-separated LITEASR_INT8 values")
    parser.add_argument("--rows", type=int, default=8, help="decoder rows of the shared run")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "bench" / "batch_invariance.json")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    results = []
    for int8 in args.int8.split(","):
        for split in args.splits.split(","):
            row = compare(args.model, split, None if int8 == "off" else int8, args.rows)
            results.append(row)
            print(
                f"{row['model']} int8 {row['int8']} {split}: {row['same_tokens']}/{row['windows']} windows with "
                f"the same tokens alone and in {row['rows']} rows ({row['differing_after_a_fallback']} of the "
                f"others after a fallback), WER {100 * row['wer_alone']:.2f}% alone, "
                f"{100 * row['wer_shared']:.2f}% shared; {row['seconds_alone']:.1f} s vs "
                f"{row['seconds_shared']:.1f} s",
                flush=True,
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
