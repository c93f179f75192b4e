"""The other-voice split (data/voices) is well formed and shares no voice or sentence with calibration."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from liteasr.evaluate import normalize_text
from liteasr.manifest import read_manifest
from tests.conftest import MANIFEST, REPO

VOICES_DIR = REPO / "data" / "voices"
VOICES = VOICES_DIR / "manifest.jsonl"


@pytest.fixture(scope="module")
def clips():
    return read_manifest(VOICES, split="voices")


def test_every_row_is_in_the_voices_split(clips):
    assert len(clips) == len(read_manifest(VOICES)) >= 100


def test_audio_is_16k_mono_16bit_flac_of_the_stated_duration(clips):
    for clip in clips:
        info = sf.info(clip.audio)
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16_000, 1), (
            clip.id
        )
        assert info.frames / info.samplerate == pytest.approx(clip.duration, abs=0.002), clip.id
        assert 3.0 <= clip.duration <= 15.0, clip.id


def test_small_enough_to_keep_in_the_repo(clips):
    assert sum(clip.audio.stat().st_size for clip in clips) < 15e6


def test_no_calibration_voice_or_text(clips):
    calib = read_manifest(MANIFEST, split="calib")
    assert not {c.speaker for c in clips} & {c.speaker for c in calib}
    # Voices from the engines that calibration used (flite, piper) stay out too, whatever their id.
    assert not [c.speaker for c in clips if c.speaker.startswith(("flite", "piper", "festival_slt"))]
    calib_texts = {normalize_text(c.text) for c in calib}
    assert not [c.id for c in clips if normalize_text(c.text) in calib_texts]


def test_sentences_are_distinct_and_match_the_script_input(clips):
    sentences = [
        s for s in (VOICES_DIR / "sentences.txt").read_text(encoding="utf-8").splitlines() if s.strip()
    ]
    assert [c.text for c in clips] == sentences
    assert len({normalize_text(c.text) for c in clips}) == len(clips)


def test_rows_name_source_and_licence():
    for line in VOICES.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert row["kind"] == "synthetic" and row["source"] and row["license"], row["id"]
