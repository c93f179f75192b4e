"""Voice activity detection with the real Silero model: speech is found, no-speech audio gives no windows, and
windows keep the times of the original audio."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from signals import NO_SPEECH, no_speech

from liteasr.audio import SAMPLE_RATE, WINDOW_SECONDS, load_audio
from liteasr.errors import InvalidOptionError
from liteasr.vad import VadOptions, VoiceActivityDetector, speech_windows, vad_windows

LONG = "asterisk_demo-instruct"  # 73 s of prompts with pauses: three windows


@pytest.fixture(scope="module")
def detector() -> VoiceActivityDetector:
    return VoiceActivityDetector()


@pytest.fixture(scope="module")
def audio_of(clip_path):
    cache: dict[str, np.ndarray] = {}

    def load(clip_id: str) -> np.ndarray:
        if clip_id not in cache:
            cache[clip_id] = load_audio(clip_path(clip_id))
        return cache[clip_id]

    return load


def _check_spans(spans: list[tuple[int, int]], length: int) -> None:
    assert spans == sorted(spans)
    for (start, end), following in zip(spans, [*spans[1:], None], strict=True):
        assert 0 <= start < end <= length
        if following is not None:
            assert end <= following[0]


def _check_windows(windows, audio: np.ndarray) -> None:
    previous_end = 0
    for window in windows:
        start = round(window.offset * SAMPLE_RATE)
        assert len(window.samples) <= WINDOW_SECONDS * SAMPLE_RATE
        assert start >= previous_end  # in order, no overlap
        assert np.array_equal(window.samples, audio[start : start + len(window.samples)])  # original audio
        previous_end = start + len(window.samples)


def _loud_frames(audio: np.ndarray, frame: int = 320) -> np.ndarray:
    """Sample indices of the 20 ms frames within 20 dB of the loudest: in a clean recording, speech."""
    n = len(audio) // frame
    energy = np.square(audio[: n * frame].reshape(n, frame)).mean(axis=1)
    return np.flatnonzero(energy > energy.max() / 100) * frame + frame // 2


def _inside(samples: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    return np.array([any(start <= s < end for start, end in spans) for s in samples])


@pytest.mark.parametrize("clip_id", ["jfk", "mfa_61-70968-0000", "ps_goforward", LONG])
def test_speech_spans_cover_the_words(detector, audio_of, clip_id):
    audio = audio_of(clip_id)
    spans = detector.speech(audio)
    _check_spans(spans, len(audio))
    assert _inside(_loud_frames(audio), spans).mean() >= 0.98


@pytest.mark.parametrize("name", NO_SPEECH)
def test_no_speech_gives_no_windows(detector, name):
    audio = no_speech()[name]
    assert 10 * SAMPLE_RATE <= len(audio) <= 60 * SAMPLE_RATE
    assert detector.speech(audio) == []
    assert vad_windows(audio, detector) == []


def test_windows_of_long_audio_are_contiguous_original_audio(detector, audio_of):
    audio = audio_of(LONG)
    spans = detector.speech(audio)
    windows = speech_windows(audio, spans)
    assert [(w.offset, len(w.samples)) for w in windows] == [
        (w.offset, len(w.samples)) for w in vad_windows(audio, detector)
    ]
    _check_windows(windows, audio)
    assert 3 <= len(windows) <= 4  # packed: 73 s of speech is three windows, as split_windows makes
    covered = [
        (round(w.offset * SAMPLE_RATE), round(w.offset * SAMPLE_RATE) + len(w.samples)) for w in windows
    ]
    for start, end in spans:  # every span lies in one window
        assert any(lo <= start and end <= hi for lo, hi in covered)


def test_a_span_longer_than_a_window_is_cut_without_losing_audio(audio_of):
    audio = audio_of(LONG)
    spans = [(8000, len(audio) - 8000)]  # 72 s of "speech"
    windows = speech_windows(audio, spans)
    _check_windows(windows, audio)
    assert len(windows) == 3
    assert round(windows[0].offset * SAMPLE_RATE) == 8000
    assert sum(len(w.samples) for w in windows) == len(audio) - 16000  # back to back: nothing dropped


def test_speech_windows_merges_spans_up_to_the_limit():
    audio = np.zeros(100 * SAMPLE_RATE, dtype=np.float32)
    s = SAMPLE_RATE
    spans = [(1 * s, 5 * s), (10 * s, 20 * s), (28 * s, 33 * s), (70 * s, 71 * s)]
    windows = speech_windows(audio, spans)
    assert [(w.offset, len(w.samples) / s) for w in windows] == [(1.0, 19.0), (28.0, 5.0), (70.0, 1.0)]
    assert speech_windows(audio, []) == []
    assert speech_windows(audio, [(5 * s, 5 * s), (200 * s, 300 * s)]) == []  # empty or outside: ignored


def test_spliced_audio_keeps_the_gap(detector, audio_of):
    a, b = audio_of("mfa_61-70968-0000"), audio_of("ps_goforward")
    gap = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
    spliced = np.concatenate([a, gap, b])
    b_start = len(a) + len(gap)
    # The true pause: from A's last loud frame to B's first one.
    true_gap = (b_start + _loud_frames(b)[0]) - _loud_frames(a)[-1]
    for padding_ms in (0, 300):
        spans = detector.speech(spliced, VadOptions(prefix_padding_ms=padding_ms))
        _check_spans(spans, len(spliced))
        assert _inside(_loud_frames(spliced), spans).mean() >= (1.0 if padding_ms else 0.95)
        last_a = max(end for _, end in spans if end <= b_start)
        first_b = min(start for start, _ in spans if start >= len(a))
        expected = true_gap - 2 * padding_ms * SAMPLE_RATE // 1000
        assert abs((first_b - last_a) - expected) <= 0.15 * SAMPLE_RATE  # about five 32 ms frames
    windows = vad_windows(spliced, detector)  # A and B fit one window, the silence between them kept
    assert len(windows) == 1
    _check_windows(windows, spliced)


def test_two_threads_at_once_get_the_same_spans(detector, audio_of):
    audios = [audio_of(LONG), audio_of("jfk")]
    expected = [detector.speech(audio) for audio in audios]
    barrier = threading.Barrier(len(audios))
    results: dict[int, list] = {}

    def run(i: int) -> None:
        barrier.wait()
        results[i] = [detector.speech(audios[i]) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(audios))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: [expected[i]] * 3 for i in range(len(audios))}


def test_bad_input(detector, audio_of):
    assert detector.speech(np.zeros(0, dtype=np.float32)) == []
    assert vad_windows(np.zeros(0, dtype=np.float32), detector) == []
    assert detector.speech(np.zeros(100, dtype=np.float32)) == []  # shorter than one frame
    audio = audio_of("jfk")
    assert detector.speech(audio.astype(np.float64)) == detector.speech(audio)
    with pytest.raises(TypeError, match="float"):
        detector.speech((audio * 32767).astype(np.int16))
    with pytest.raises(ValueError, match="1-D"):
        detector.speech(np.stack([audio, audio]))
    with pytest.raises(ValueError, match="NaN"):
        detector.speech(np.full(16000, np.nan, dtype=np.float32))
    for bad in (dict(threshold=1.5), dict(threshold=0.0), dict(silence_duration_ms=-1)):
        with pytest.raises(InvalidOptionError):
            VadOptions(**bad)


def test_loading_leaves_torch_threads_alone():
    before = torch.get_num_threads()
    VoiceActivityDetector()
    assert torch.get_num_threads() == before
