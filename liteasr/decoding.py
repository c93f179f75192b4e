"""What decoding one window means, whatever runs the model: options, the loop guard's rules, the result types.

The step engine (`liteasr.scheduler`) decides *when* each rule applies; this module says *what* each rule is, so
that the service, the command line and the reference decoder of the tests share one definition:

- the token budget of a window is bounded by its duration;
- a window whose output looks degenerate (gzip compression ratio, average log-probability, a repeated n-gram at its
  end, or no end token within the budget) is decoded again at rising temperatures, as openai-whisper does;
- a loop that survives every temperature is cut after its first repetition;
- a window the model thinks holds no speech gives no text.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from liteasr.audio import Window

__all__ = [
    "MAX_PROMPT_TOKENS",
    "MAX_WINDOW_TOKENS",
    "TASKS",
    "Attempt",
    "DecodeOptions",
    "LoopGuard",
    "Segment",
    "TokenEvent",
    "Transcription",
    "WindowResult",
    "Word",
    "compression_ratio",
    "find_repetition",
    "first_period_end",
    "stitch",
]

TASKS = ("transcribe", "translate")
# CTranslate2 caps one window at 224 tokens; a window that needs more is looping.
MAX_WINDOW_TOKENS = 224
# Whisper's previous-text prompt: half the decoder context, less <|startofprev|> (openai-whisper cuts it so too).
MAX_PROMPT_TOKENS = 223


@dataclass(frozen=True)
class DecodeOptions:
    """What one request asks of the decoder."""

    language: str | None = None  # ISO-639-1 code; None: detected (multilingual) or English (.en models)
    task: str = "transcribe"  # or "translate" (multilingual models only)
    timestamps: bool = False  # segment start/end times
    words: bool = False  # word start/end times (cross-attention alignment after decoding)
    prompt: str | None = None  # previous text: spellings and style to follow (its last MAX_PROMPT_TOKENS)
    temperature: float = (
        0.0  # where the fallback ladder starts; 0: greedy, then the loop guard's temperatures
    )

    def ladder(self, guard: LoopGuard) -> tuple[float, ...]:
        """The temperatures of a window's attempts: this one first, then the guard's higher ones."""
        if not guard.enabled:
            return (self.temperature,)
        return (self.temperature, *(t for t in guard.temperatures if t > self.temperature))


@dataclass(frozen=True)
class LoopGuard:
    """How hard the engine fights repetition loops; `LoopGuard(enabled=False)` is plain greedy decoding."""

    enabled: bool = True
    tokens_per_second: float = 8.0  # token budget per second of audio (fast speech is ~5 tokens/s)
    min_tokens: int = 24  # budget floor for very short windows
    temperatures: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)  # fallback temperatures after greedy
    compression_ratio_threshold: float = 2.4  # gzip ratio of the text above which a window counts as looping
    logprob_threshold: float = -1.0  # mean token log-probability below which a window is retried
    no_speech_threshold: float = 0.6  # with a low log-probability, a window above this is silence
    certain_no_speech: float = (
        0.9  # above this a window is silence whatever its log-probability ("you" on silence)
    )
    min_repeats: int = 4  # an n-gram repeated this many times at the end of a window is a loop
    seed: int = 0  # sampling seed of every fallback, so the same audio gives the same text

    def token_budget(self, seconds: float) -> int:
        """Most tokens a window of `seconds` may produce before it counts as looping."""
        if not self.enabled:
            return MAX_WINDOW_TOKENS
        return min(MAX_WINDOW_TOKENS, self.min_tokens + math.ceil(self.tokens_per_second * seconds))

    def is_silent(self, no_speech_prob: float, avg_logprob: float) -> bool:
        """openai-whisper's no-speech rule, plus: a window the model is sure is silent stays silent."""
        return self.enabled and (
            no_speech_prob > self.certain_no_speech
            or (no_speech_prob > self.no_speech_threshold and avg_logprob < self.logprob_threshold)
        )


@dataclass(frozen=True)
class Attempt:
    """One decoding of one window at one temperature: prompt and end token stripped."""

    tokens: tuple[int, ...]
    avg_logprob: float  # mean log-probability of the tokens (the end token not counted)
    finished: bool  # ended with the end token within its budget
    temperature: float

    def degenerate(self, text: str, guard: LoopGuard) -> bool:
        """openai-whisper's fallback test, plus: ran into the token budget, or ends in a repeated n-gram."""
        return (
            not self.finished
            or compression_ratio(text) > guard.compression_ratio_threshold
            or (bool(self.tokens) and self.avg_logprob < guard.logprob_threshold)
            or find_repetition(self.tokens, guard.min_repeats) is not None
        )


@dataclass(frozen=True)
class TokenEvent:
    """A token as it is decoded. A higher `attempt` than before means the window is being decoded again (a
    fallback at the next temperature): the tokens of earlier attempts are void."""

    window: int  # the id `Scheduler.add` returned
    attempt: int  # 0: the first attempt (greedy unless a temperature was asked for); n: the n-th fallback
    token: int


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0


@dataclass(frozen=True)
class Word:
    start: float  # seconds from the start of the window (of the audio, once stitched)
    end: float
    text: str  # with its leading space, as Whisper writes it; punctuation attached
    probability: float  # mean probability of its tokens


@dataclass(frozen=True)
class WindowResult:
    """The decoder's answer for one window; segment times are relative to the window."""

    text: str
    language: str
    segments: tuple[Segment, ...]
    tokens: tuple[int, ...]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    looped: bool  # the first attempt looked degenerate (fallback or cut followed)
    cut: bool = False  # a loop survived every temperature and was cut
    words: tuple[Word, ...] = ()  # with DecodeOptions.words


@dataclass(frozen=True)
class Transcription:
    text: str
    language: str
    duration: float  # seconds of audio
    segments: tuple[Segment, ...] = ()
    windows: int = 1
    loops: int = 0  # windows whose greedy output looked like a loop
    words: tuple[Word, ...] = ()


def stitch(windows: Sequence[Window], results: Sequence[WindowResult], duration: float) -> Transcription:
    """Join the windows of one audio back in order, shifting segment times by each window's offset."""
    segments, words = [], []
    for window, result in zip(windows, results, strict=True):
        for segment in result.segments:
            segments.append(
                replace(segment, start=segment.start + window.offset, end=segment.end + window.offset)
            )
        for word in result.words:
            words.append(replace(word, start=word.start + window.offset, end=word.end + window.offset))
    text = " ".join(result.text for result in results if result.text)
    languages = [result.language for result in results if result.text] or [results[0].language]
    return Transcription(
        text=text,
        language=max(set(languages), key=languages.count),
        duration=duration,
        segments=tuple(segments),
        windows=len(results),
        loops=sum(result.looped for result in results),
        words=tuple(words),
    )


def find_repetition(tokens: Sequence[int], min_repeats: int = 4, max_period: int = 24) -> int | None:
    """Index where a trailing run of one n-gram repeated at least `min_repeats` times starts, else None.

    Only the run at the end counts: that is what a loop looks like when the token budget stops it.
    """
    n = len(tokens)
    for period in range(1, min(max_period, n // min_repeats) + 1):
        repeats = 1
        while (repeats + 1) * period <= n and list(
            tokens[n - (repeats + 1) * period : n - repeats * period]
        ) == list(tokens[n - period :]):
            repeats += 1
        if repeats >= min_repeats:
            return n - repeats * period
    return None


def first_period_end(tokens: Sequence[int], start: int) -> int:
    """End of the first occurrence of the repeated n-gram that starts at `start`."""
    tokens = list(tokens)
    n = len(tokens)
    for period in range(1, n - start + 1):
        if (n - start) % period == 0 and tokens[start:n] == tokens[start : start + period] * (
            (n - start) // period
        ):
            return start + period
    return n


def compression_ratio(text: str) -> float:
    """openai-whisper's loop signal: repetitive text compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(gzip.compress(data)) if data else 0.0
