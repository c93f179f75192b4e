"""Accuracy of one or more models on a speech set: normalized WER, repetition loops, size and speed, and a Pareto plot.

WER is computed on text passed through Whisper's English normalizer (the one the published LiteASR and Whisper figures
use), so casing, punctuation, spelling variants and spelled-out numbers do not count as errors. Two summaries are
reported because they answer different questions: corpus WER (all errors over all reference words) weighs long clips
more, and the mean of per-utterance WER capped at 100% keeps one runaway hallucination from dominating it.

Models are taken through an engine factory (source -> engine), so the CLI passes `Engine.load` and tests can pass any
object with the same few attributes.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import jiwer
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from liteasr.audio import SAMPLE_RATE, load_audio
from liteasr.errors import LiteASRError
from liteasr.manifest import Clip

if TYPE_CHECKING:
    from liteasr.engine import ModelInfo

__all__ = [
    "CALIBRATION_SPEAKER",
    "DEFAULT_GROUPS",
    "ClipResult",
    "EvalEngine",
    "EvalReport",
    "ModelResult",
    "UtteranceScore",
    "WerScores",
    "evaluate_model",
    "evaluate_models",
    "is_repetition_loop",
    "normalize_text",
    "wer_scores",
]

log = logging.getLogger(__name__)

# The voice that dominates the speech set and its calibration split: WER on other voices shows overfitting to it.
CALIBRATION_SPEAKER = "allison_smith"
DEFAULT_GROUPS: Mapping[str, Callable[[Clip], bool]] = MappingProxyType(
    {
        CALIBRATION_SPEAKER: lambda clip: clip.speaker == CALIBRATION_SPEAKER,
        "other speakers": lambda clip: clip.speaker != CALIBRATION_SPEAKER,
    }
)


@functools.lru_cache(maxsize=1)
def _normalizer() -> EnglishTextNormalizer:
    spelling = (
        importlib.resources.files("liteasr").joinpath("whisper-english-spelling.json").read_text("utf-8")
    )
    return EnglishTextNormalizer(json.loads(spelling))


def normalize_text(text: str) -> str:
    """Whisper's English normalization: lower case, no punctuation, British -> American spelling, digits."""
    return _normalizer()(text)


@dataclass(frozen=True)
class UtteranceScore:
    reference: str  # normalized reference
    hypothesis: str  # normalized hypothesis
    errors: int  # substitutions + deletions + insertions
    words: int  # words in the normalized reference
    wer: float  # errors / words capped at 1.0; an empty reference scores 0.0 if the hypothesis is empty too, else 1.0


@dataclass(frozen=True)
class WerScores:
    corpus_wer: float  # errors / words, uncapped; with no reference words at all, 0.0 if no errors else 1.0
    mean_utterance_wer: float  # mean of UtteranceScore.wer
    errors: int
    words: int
    utterances: tuple[UtteranceScore, ...]


def _score_utterance(reference: str, hypothesis: str) -> UtteranceScore:
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    words = len(ref.split())
    if words == 0:
        # jiwer refuses empty references; every hypothesis word is an insertion.
        errors = len(hyp.split())
        return UtteranceScore(ref, hyp, errors, 0, 1.0 if errors else 0.0)
    out = jiwer.process_words(ref, hyp)
    errors = out.substitutions + out.deletions + out.insertions
    return UtteranceScore(ref, hyp, errors, words, min(1.0, errors / words))


def wer_scores(references: Sequence[str], hypotheses: Sequence[str]) -> WerScores:
    """Corpus and capped mean per-utterance WER of raw (unnormalized) texts."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("WER of zero utterances is undefined")
    scores = tuple(_score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))
    errors = sum(s.errors for s in scores)
    words = sum(s.words for s in scores)
    corpus = errors / words if words else float(errors > 0)
    return WerScores(
        corpus_wer=corpus,
        mean_utterance_wer=sum(s.wer for s in scores) / len(scores),
        errors=errors,
        words=words,
        utterances=scores,
    )


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def is_repetition_loop(
    text: str,
    *,
    max_compression_ratio: float = 2.4,
    window_words: int = 100,
    min_repeats: int = 3,
    min_repeated_words: int = 10,
    max_ngram: int = 50,
) -> bool:
    """Whether a transcript looks like a decoder stuck in a loop, for counting them in evaluation outputs.

    Two signs, either is enough: a run of `min_repeats` or more back-to-back copies of the same word n-gram covering
    at least `min_repeated_words` words ("thank you" five times, a sentence three times); or, as openai-whisper's
    temperature fallback does, a zlib compression ratio above 2.4 within some window of `window_words` words (about
    one 30 s segment: over whole long transcripts ordinary English compresses past 2.4 too).
    """
    words = re.findall(r"[\w']+", text.lower())
    for n in range(1, min(max_ngram, len(words) // min_repeats) + 1):
        run = 0  # consecutive positions j with words[j] == words[j + n]
        for j in range(len(words) - n):
            run = run + 1 if words[j] == words[j + n] else 0
            copies = (run + n) // n
            if copies >= min_repeats and copies * n >= min_repeated_words:
                return True
    spaced = text.split()
    return any(
        _compression_ratio(" ".join(spaced[start : start + window_words])) > max_compression_ratio
        for start in range(0, max(1, len(spaced) - window_words // 2), window_words // 2)
    )


class _HasText(Protocol):
    text: str


class EvalEngine(Protocol):
    """What evaluation needs of a model; `liteasr.engine.Engine` provides it."""

    @property
    def info(self) -> ModelInfo: ...

    def transcribe(self, audios: list[np.ndarray], options: Any) -> Sequence[_HasText]: ...

    def encoder_latency(self, batch_size: int, repeats: int) -> float: ...


@dataclass(frozen=True)
class ClipResult:
    id: str
    speaker: str
    reference: str  # raw reference transcript
    hypothesis: str  # raw model output
    loop: bool  # is_repetition_loop(hypothesis)
    score: UtteranceScore


@dataclass(frozen=True)
class ModelResult:
    source: str  # as given to the engine factory
    name: str
    encoder_parameters: int
    encoder_latency_seconds: float | None  # median per batch of one 30 s window; None when not measured
    transcribe_seconds: float  # wall time to transcribe every clip
    scores: WerScores  # all clips
    groups: Mapping[str, WerScores]  # per group that has clips
    loops: int  # clips whose hypothesis is a repetition loop
    clips: tuple[ClipResult, ...]


@dataclass(frozen=True)
class EvalReport:
    models: tuple[ModelResult, ...]
    audio_seconds: float  # total duration of the evaluated clips
    markdown: str  # the table written to results_md, for printing
    results_json: Path
    results_md: Path
    pareto_png: Path


def evaluate_models(
    model_sources: Sequence[str],
    clips: Sequence[Clip],
    out_dir: Path,
    *,
    engine_factory: Callable[[str], EvalEngine],
    options: Any = None,
    batch_size: int = 8,
    groups: Mapping[str, Callable[[Clip], bool]] = DEFAULT_GROUPS,
    latency_repeats: int | None = 5,
) -> EvalReport:
    """Evaluate each model in turn on the same clips, then write results.json, results.md and pareto.png.

    `options` is passed as is to every `transcribe` call. One engine is alive at a time, so models that do not fit
    in memory together can still be compared. `latency_repeats=None` skips the encoder latency measurement.
    """
    if not model_sources:
        raise ValueError("no models to evaluate")
    _check_inputs(clips, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)  # fail before the slow part, not after it
    audios = [load_audio(clip.audio) for clip in clips]
    models = tuple(
        evaluate_model(
            source,
            clips,
            engine_factory=engine_factory,
            audios=audios,
            options=options,
            batch_size=batch_size,
            groups=groups,
            latency_repeats=latency_repeats,
        )
        for source in model_sources
    )
    audio_seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    report = EvalReport(
        models=models,
        audio_seconds=audio_seconds,
        markdown=_report_markdown(models, audio_seconds, list(groups)),
        results_json=out_dir / "results.json",
        results_md=out_dir / "results.md",
        pareto_png=out_dir / "pareto.png",
    )
    report.results_json.write_text(json.dumps(_report_json(report), indent=2, ensure_ascii=False) + "\n")
    report.results_md.write_text(report.markdown)
    _plot_pareto(report.models, report.pareto_png)
    return report


def _check_inputs(clips: Sequence[Clip], batch_size: int) -> None:
    if not clips:
        raise ValueError("no clips to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def evaluate_model(
    source: str,
    clips: Sequence[Clip],
    *,
    engine_factory: Callable[[str], EvalEngine],
    audios: list[np.ndarray] | None = None,
    options: Any = None,
    batch_size: int = 8,
    groups: Mapping[str, Callable[[Clip], bool]] = DEFAULT_GROUPS,
    latency_repeats: int | None = 5,
) -> ModelResult:
    """One model on the clips, writing nothing: what `evaluate_models` tabulates and the compression gate compares.

    `audios`: the clips' audio when already loaded (to share it between models), else it is loaded here.
    """
    _check_inputs(clips, batch_size)
    if audios is None:
        audios = [load_audio(clip.audio) for clip in clips]
    engine = engine_factory(source)
    log.info("evaluating %s (%s) on %d clips", engine.info.name, source, len(clips))
    start = time.perf_counter()
    hypotheses: list[str] = []
    for first in range(0, len(audios), batch_size):
        batch = audios[first : first + batch_size]
        outputs = engine.transcribe(batch, options)
        if len(outputs) != len(batch):
            raise LiteASRError(
                f"{engine.info.name} returned {len(outputs)} transcripts for {len(batch)} clips"
            )
        hypotheses.extend(output.text for output in outputs)
    transcribe_seconds = time.perf_counter() - start
    latency = (
        None if latency_repeats is None else engine.encoder_latency(batch_size=1, repeats=latency_repeats)
    )
    scores = wer_scores([clip.text for clip in clips], hypotheses)
    results = tuple(
        ClipResult(clip.id, clip.speaker, clip.text, hypothesis, is_repetition_loop(hypothesis), score)
        for clip, hypothesis, score in zip(clips, hypotheses, scores.utterances, strict=True)
    )
    by_group = {}
    for group, member in groups.items():
        chosen = [i for i, clip in enumerate(clips) if member(clip)]
        if chosen:
            by_group[group] = wer_scores([clips[i].text for i in chosen], [hypotheses[i] for i in chosen])
    return ModelResult(
        source=source,
        name=engine.info.name,
        encoder_parameters=engine.info.encoder_parameters,
        encoder_latency_seconds=latency,
        transcribe_seconds=transcribe_seconds,
        scores=scores,
        groups=by_group,
        loops=sum(r.loop for r in results),
        clips=results,
    )


def _summary_json(scores: WerScores) -> dict[str, Any]:
    return {
        "clips": len(scores.utterances),
        "wer": scores.corpus_wer,
        "mean_utterance_wer": scores.mean_utterance_wer,
        "errors": scores.errors,
        "words": scores.words,
    }


def _report_json(report: EvalReport) -> dict[str, Any]:
    return {
        "clips": len(report.models[0].clips),
        "audio_seconds": report.audio_seconds,
        "normalizer": "whisper-english",
        "models": [
            {
                "source": m.source,
                "name": m.name,
                "encoder_parameters": m.encoder_parameters,
                "encoder_latency_seconds": m.encoder_latency_seconds,
                "transcribe_seconds": m.transcribe_seconds,
                **_summary_json(m.scores),
                "loops": m.loops,
                "groups": {group: _summary_json(scores) for group, scores in m.groups.items()},
                "per_clip": [
                    {
                        "id": c.id,
                        "speaker": c.speaker,
                        "reference": c.reference,
                        "hypothesis": c.hypothesis,
                        "normalized_reference": c.score.reference,
                        "normalized_hypothesis": c.score.hypothesis,
                        "errors": c.score.errors,
                        "words": c.score.words,
                        "wer": c.score.wer,
                        "loop": c.loop,
                    }
                    for c in m.clips
                ],
            }
            for m in report.models
        ],
    }


def _report_markdown(models: Sequence[ModelResult], audio_seconds: float, group_names: list[str]) -> str:
    header = [
        "Model",
        "Encoder params (M)",
        "Encoder latency, batch 1 (ms)",
        "WER (%)",
        "Mean utterance WER, capped (%)",
        "Loops",
        *(f"WER {group} (%)" for group in group_names),
    ]
    rows = []
    for m in models:
        latency = "n/a" if m.encoder_latency_seconds is None else f"{m.encoder_latency_seconds * 1000:.1f}"
        group_cells = [f"{m.groups[g].corpus_wer * 100:.2f}" if g in m.groups else "n/a" for g in group_names]
        rows.append(
            [
                m.name.replace("|", "\\|"),
                f"{m.encoder_parameters / 1e6:.2f}",
                latency,
                f"{m.scores.corpus_wer * 100:.2f}",
                f"{m.scores.mean_utterance_wer * 100:.2f}",
                str(m.loops),
                *group_cells,
            ]
        )
    lines = [
        "# Evaluation",
        "",
        f"{len(models[0].clips)} clips, {audio_seconds / 60:.1f} min of audio; "
        "WER on Whisper-normalized text.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def _plot_pareto(models: Sequence[ModelResult], path: Path) -> None:
    """WER against encoder size; the staircase joins the models that no other beats on both."""
    params = [m.encoder_parameters / 1e6 for m in models]
    wers = [m.scores.corpus_wer * 100 for m in models]
    front: list[tuple[float, float]] = []
    for x, y in sorted(zip(params, wers, strict=True)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.step([x for x, _ in front], [y for _, y in front], where="post", color="0.6", zorder=1)
    axes.scatter(params, wers, zorder=2)
    for model, x, y in zip(models, params, wers, strict=True):
        axes.annotate(model.name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel("Encoder parameters (millions)")
    axes.set_ylabel("WER (%)")
    axes.set_title("WER against encoder size")
    axes.grid(alpha=0.3)
    axes.margins(x=0.15, y=0.1)  # room for the labels
    figure.savefig(path, dpi=120)
