"""Audio with no speech in it, made with numpy (seeded): what Whisper hallucinates on and VAD must skip.

Shared by tests/test_vad.py and bench/vad_bench.py, so that the test and the published figures use the same
inputs. Every signal is 16 kHz mono float32 in [-1, 1].
"""

from __future__ import annotations

import numpy as np

__all__ = ["NO_SPEECH", "no_speech", "pink_noise"]

RATE = 16000


def _seconds(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * RATE)) / RATE


def _rms(x: np.ndarray, level: float) -> np.ndarray:
    return (x * (level / np.sqrt(np.mean(np.square(x))))).astype(np.float32)


def pink_noise(seconds: float, rng: np.random.Generator, level: float = 0.1) -> np.ndarray:
    """1/f noise: white noise shaped in the frequency domain (power falls 3 dB an octave)."""
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    return _rms(np.fft.irfft(spectrum, n), level)


def _tones(seconds: float) -> np.ndarray:
    """A steady 440 Hz tone under 1 kHz beeps (0.5 s on, 0.5 s off), like a test signal or a phone line."""
    t = _seconds(seconds)
    beeps = np.sin(2 * np.pi * 1000 * t) * ((t % 1.0) < 0.5)
    return (0.2 * np.sin(2 * np.pi * 440 * t) + 0.3 * beeps).astype(np.float32)


def _note(freq: float, seconds: float) -> np.ndarray:
    """A plucked note: six harmonics, fast attack, exponential decay."""
    t = _seconds(seconds)
    wave = sum(np.sin(2 * np.pi * freq * k * t) / k**1.5 for k in range(1, 7))
    envelope = np.minimum(t / 0.01, 1.0) * np.exp(-3.0 * t)
    return wave * envelope


def _music(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Chords (C, G, Am, F; one a bar at 120 bpm) under a random pentatonic melody of eighth notes."""
    out = np.zeros(int(seconds * RATE))
    chords = [(261.6, 329.6, 392.0), (196.0, 246.9, 293.7), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6)]
    bar, eighth = 2.0, 0.25
    for i, start in enumerate(np.arange(0, seconds, bar)):
        at = int(start * RATE)
        for freq in chords[i % len(chords)]:
            note = _note(freq, bar)[: len(out) - at]
            out[at : at + len(note)] += 0.3 * note
    scale = [523.3, 587.3, 659.3, 784.0, 880.0]
    for start in np.arange(0, seconds, eighth):
        at = int(start * RATE)
        note = _note(float(rng.choice(scale)), 4 * eighth)[: len(out) - at]
        out[at : at + len(note)] += 0.4 * note
    return _rms(out, 0.15)


def _hum(seconds: float, mains: float, rng: np.random.Generator) -> np.ndarray:
    """Mains hum (50 or 60 Hz and its harmonics, odd ones stronger, as a transformer buzzes) over a faint room
    noise floor."""
    t = _seconds(seconds)
    hum = sum((1.0 if k % 2 else 0.4) / k * np.sin(2 * np.pi * mains * k * t + k) for k in range(1, 9))
    return _rms(hum, 0.05) + pink_noise(seconds, rng, 0.005)


def no_speech(seed: int = 0) -> dict[str, np.ndarray]:
    """The no-speech inputs, by name: 10 to 60 s each."""
    rng = np.random.default_rng(seed)
    return {
        "silence 10 s": np.zeros(10 * RATE, dtype=np.float32),
        "silence 60 s": np.zeros(60 * RATE, dtype=np.float32),
        "white noise 30 s": np.clip(0.1 * rng.standard_normal(30 * RATE), -1, 1).astype(np.float32),
        "loud white noise 20 s": np.clip(0.4 * rng.standard_normal(20 * RATE), -1, 1).astype(np.float32),
        "pink noise 30 s": pink_noise(30, rng),
        "tones 30 s": _tones(30),
        "music 45 s": _music(45, rng),
        "50 Hz hum 20 s": _hum(20, 50.0, rng),
        "60 Hz hum 20 s": _hum(20, 60.0, rng),
    }


NO_SPEECH = tuple(no_speech())
