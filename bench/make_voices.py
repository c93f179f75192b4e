"""Regenerate the other-voice split (`data/voices/`): TTS voices that neither `calib` nor `dev` holds.

Needs Debian's `espeak-ng`, `festival` and `festvox-kdlpc16k` (`apt-get install espeak-ng festival
festvox-kdlpc16k`); numpy, scipy and soundfile come with the project. Every clip is one sentence of
`data/voices/sentences.txt` spoken by one voice at one of three speaking rates; half of the clips then get white,
pink or babble noise and/or a synthetic room impulse response, each drawn from a random generator seeded by the
clip's index, so the same packages give the same audio. The list of clips (voice, rate, augmentation) is fixed here
and written to the README's table by hand; `--check` regenerates into a temporary folder and compares.

    python bench/make_voices.py            # rewrite data/voices/audio and data/voices/manifest.jsonl
    python bench/make_voices.py --check    # regenerate elsewhere and report clips whose audio differs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve, resample_poly

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "voices"
RATE = 16_000
SEED = 14


@dataclass(frozen=True)
class Voice:
    speaker: str  # manifest speaker id
    engine: str  # "espeak-ng" or "festival"
    name: str  # espeak-ng voice+variant, or festival voice function
    rates: tuple[float, float, float]  # slow, normal, fast: espeak-ng words/minute, festival Duration_Stretch


_ESPEAK_RATES = (140.0, 170.0, 205.0)
# Not used: en-gb-x-gbcwmd+f5, en-029+m2, en-us+Annie, en-gb+Andy, en-us+Alicia and en-gb-x-rp+f4 scored 38-50%
# WER on clean normal-rate clips with dense tiny.en, against 16-28% for the voices here (data/voices/README.md).
VOICES = [
    Voice("espeak_en-us", "espeak-ng", "en-us", _ESPEAK_RATES),
    Voice("espeak_en-us+f3", "espeak-ng", "en-us+f3", _ESPEAK_RATES),
    Voice("espeak_en-us-nyc+m4", "espeak-ng", "en-us-nyc+m4", _ESPEAK_RATES),
    Voice("espeak_en-gb+f4", "espeak-ng", "en-gb+f4", _ESPEAK_RATES),
    Voice("espeak_en-gb-x-rp+m3", "espeak-ng", "en-gb-x-rp+m3", _ESPEAK_RATES),
    Voice("espeak_en-gb-scotland+f2", "espeak-ng", "en-gb-scotland+f2", _ESPEAK_RATES),
    Voice("espeak_en-gb-x-gbclan+m7", "espeak-ng", "en-gb-x-gbclan+m7", _ESPEAK_RATES),
    Voice("espeak_en-us+m2", "espeak-ng", "en-us+m2", _ESPEAK_RATES),
    Voice("espeak_en-gb+m2", "espeak-ng", "en-gb+m2", _ESPEAK_RATES),
    Voice("espeak_en-gb+f3", "espeak-ng", "en-gb+f3", _ESPEAK_RATES),
    Voice("espeak_en-us+steph", "espeak-ng", "en-us+steph", _ESPEAK_RATES),
    Voice("festival_ked_diphone", "festival", "voice_ked_diphone", (1.2, 1.0, 0.85)),
]
RATE_NAMES = ("slow", "normal", "fast")

# One entry per position of a clip within its voice (12 clips a voice): half clean, half augmented.
# (noise kind or None, SNR dB, reverberation time RT60 in s or None)
AUGMENTATIONS: list[tuple[str | None, float, float | None]] = [
    (None, 0.0, None),
    (None, 0.0, None),
    (None, 0.0, None),
    ("white", 20.0, None),
    (None, 0.0, None),
    ("pink", 15.0, None),
    (None, 0.0, 0.4),
    ("babble", 15.0, None),
    (None, 0.0, None),
    ("pink", 15.0, 0.5),
    ("babble", 12.0, None),
    ("white", 15.0, 0.3),
]


@dataclass(frozen=True)
class Plan:
    index: int
    id: str
    text: str
    voice: Voice
    rate: int  # index into voice.rates
    noise: str | None
    snr_db: float
    rt60: float | None

    @property
    def augmentation(self) -> str:
        parts = [f"{self.noise} noise {self.snr_db:g} dB SNR"] if self.noise else []
        if self.rt60:
            parts.insert(0, f"reverb RT60 {self.rt60:g} s")
        return ", ".join(parts) or "clean"


def plans(sentences: list[str]) -> list[Plan]:
    """Sentence i goes to voice i mod 12; its position among that voice's clips picks rate and augmentation."""
    out = []
    for i, text in enumerate(sentences):
        voice = VOICES[i % len(VOICES)]
        position = i // len(VOICES)
        noise, snr, rt60 = AUGMENTATIONS[position % len(AUGMENTATIONS)]
        out.append(Plan(i, f"voices_{i:03d}", text, voice, position % 3, noise, snr, rt60))
    return out


def synthesize(plan: Plan, work: Path) -> np.ndarray:
    """The voice's clean output at 16 kHz, float64 in [-1, 1], silence trimmed to 0.2 s a side."""
    wav = work / f"{plan.id}.wav"
    rate = plan.voice.rates[plan.rate]
    if plan.voice.engine == "espeak-ng":
        subprocess.run(
            ["espeak-ng", "-v", plan.voice.name, "-s", f"{rate:g}", "-w", str(wav), plan.text], check=True
        )
    else:
        text = work / f"{plan.id}.txt"
        text.write_text(plan.text + "\n", encoding="utf-8")
        setup = f"(begin ({plan.voice.name}) (Parameter.set 'Duration_Stretch {rate:g}))"
        subprocess.run(["text2wave", "-eval", setup, str(text), "-o", str(wav)], check=True)
    audio, sr = sf.read(wav, dtype="float64")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if sr != RATE:
        g = np.gcd(sr, RATE)
        audio = resample_poly(audio, RATE // g, sr // g)
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    margin = int(0.2 * RATE)
    audio = audio[max(loud[0] - margin, 0) : loud[-1] + margin]
    return 0.5 * audio / np.abs(audio).max()


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(f), n)


def babble(n: int, others: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Five other voices' clean clips, each looped to length n from a random start, summed."""
    out = np.zeros(n)
    for k in rng.choice(len(others), size=5, replace=False):
        clip = others[k]
        start = int(rng.integers(clip.size))
        out += np.resize(np.roll(clip, -start), n)
    return out


def room_impulse(rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A direct path plus exponentially decaying noise (-60 dB at rt60), reverberant energy 3 dB under the direct."""
    n = int(rt60 * RATE)
    t = np.arange(n) / RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail[: int(0.003 * RATE)] = 0.0  # first reflections arrive a few ms after the direct sound
    tail *= np.sqrt(10 ** (-3 / 10) / np.sum(tail**2))
    tail[0] = 1.0
    return tail


def augment(plan: Plan, audio: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng([SEED, plan.index])
    if plan.rt60:
        audio = fftconvolve(audio, room_impulse(plan.rt60, rng))[: audio.size + int(0.2 * RATE)]
    if plan.noise:
        if plan.noise == "white":
            noise = rng.standard_normal(audio.size)
        elif plan.noise == "pink":
            noise = pink_noise(audio.size, rng)
        else:
            noise = babble(audio.size, others, rng)
        speech_power = np.mean(audio**2)
        noise *= np.sqrt(speech_power / np.mean(noise**2) / 10 ** (plan.snr_db / 10))
        audio = audio + noise
    return 0.7 * audio / np.abs(audio).max()


def build(out: Path, sentences: list[str]) -> list[dict]:
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    todo = plans(sentences)
    with tempfile.TemporaryDirectory() as work:
        clean = [synthesize(p, Path(work)) for p in todo]
    rows = []
    for plan, audio in zip(todo, clean, strict=True):
        others = [c for q, c in zip(todo, clean, strict=True) if q.voice != plan.voice]
        final = augment(plan, audio, others)
        path = audio_dir / f"{plan.id}.flac"
        sf.write(path, final, RATE, subtype="PCM_16", format="FLAC")
        engine = "espeak-ng 1.51" if plan.voice.engine == "espeak-ng" else "festival 2.5.0 + festvox-kdlpc16k"
        rate = plan.voice.rates[plan.rate]
        rows.append(
            {
                "id": plan.id,
                "audio": f"audio/{plan.id}.flac",
                "text": plan.text,
                "duration": round(final.size / RATE, 3),
                "speaker": plan.voice.speaker,
                "source": f"synthesized ({engine}; {RATE_NAMES[plan.rate]} {rate:g}; {plan.augmentation})",
                "license": _LICENSES[plan.voice.engine],
                "split": "voices",
                "kind": "synthetic",
            }
        )
    return rows


_LICENSES = {
    "espeak-ng": "CC0 text written for this set; voice data espeak-ng GPL-3.0-or-later",
    "festival": "CC0 text written for this set; voice festvox-kdlpc16k (CSTR permissive licence)",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    args = parser.parse_args()
    sentences = [s for s in (OUT / "sentences.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    if not args.check:
        rows = build(OUT, sentences)
        with (OUT / "manifest.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        total = sum(r["duration"] for r in rows)
        size = sum((OUT / r["audio"]).stat().st_size for r in rows)
        print(f"wrote {len(rows)} clips, {total / 60:.1f} min, {size / 1e6:.1f} MB to {OUT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = build(Path(tmp), sentences)
        differ = [
            r["id"]
            for r in rows
            if not np.array_equal(sf.read(Path(tmp) / r["audio"])[0], sf.read(OUT / r["audio"])[0])
        ]
    print(
        f"{len(rows) - len(differ)} of {len(rows)} clips identical"
        + (f"; differ: {differ}" if differ else "")
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
