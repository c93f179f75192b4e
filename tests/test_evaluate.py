"""Manifest reading, normalized WER arithmetic, loop detection, and the evaluation report files."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from matplotlib.image import imread

from liteasr.engine import ModelInfo
from liteasr.errors import LiteASRError, ManifestError
from liteasr.evaluate import (
    CALIBRATION_SPEAKER,
    evaluate_model,
    evaluate_models,
    is_repetition_loop,
    normalize_text,
    wer_scores,
)
from liteasr.manifest import Clip, read_manifest

SPEECH_DIR = Path(__file__).resolve().parents[1] / "data" / "speech"
MANIFEST = SPEECH_DIR / "manifest.jsonl"

# ---------------------------------------------------------------------------------------------------- manifest


def test_real_manifest_splits_match_its_readme():
    clips = read_manifest(MANIFEST)
    assert len(clips) == 279
    assert {s: len(read_manifest(MANIFEST, split=s)) for s in ("calib", "dev", "long")} == {
        "calib": 160,
        "dev": 116,
        "long": 3,
    }
    assert len(read_manifest(MANIFEST, split=("dev", "long"))) == 119
    assert all(c.audio.is_absolute() and c.audio.is_file() for c in clips)
    assert all(c.duration > 30 for c in read_manifest(MANIFEST, split="long"))


def test_manifest_keeps_file_order_and_fields(manifest_rows):
    clips = read_manifest(MANIFEST)
    assert [c.id for c in clips] == [r["id"] for r in manifest_rows]
    first = manifest_rows[0]
    assert clips[0] == Clip(
        id=first["id"],
        audio=(SPEECH_DIR / first["audio"]).resolve(),
        text=first["text"],
        duration=first["duration"],
        speaker=first["speaker"],
        split=first["split"],
        kind=first["kind"],
    )


def test_manifest_speaker_filters_and_max_clips():
    dev = read_manifest(MANIFEST, split="dev")
    ours = read_manifest(MANIFEST, split="dev", speakers={CALIBRATION_SPEAKER})
    others = read_manifest(MANIFEST, split="dev", exclude_speakers={CALIBRATION_SPEAKER})
    assert ours and others
    assert all(c.speaker == CALIBRATION_SPEAKER for c in ours)
    assert all(c.speaker != CALIBRATION_SPEAKER for c in others)
    assert len(ours) + len(others) == len(dev)
    assert read_manifest(MANIFEST, split="dev", max_clips=5) == dev[:5]


def write_manifest(folder: Path, rows: list[dict | str]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def row(clip_id: str = "a", **changes) -> dict:
    base = {
        "id": clip_id,
        "audio": "audio/a.wav",
        "text": "hello",
        "duration": 1.0,
        "speaker": "s",
        "split": "dev",
        "kind": "real",
    }
    return {**base, **changes}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"")
    return tmp_path


def test_manifest_paths_are_relative_to_its_folder_and_blank_lines_are_skipped(folder, monkeypatch):
    monkeypatch.chdir(folder / "audio")  # the working directory must not matter
    path = write_manifest(folder, [row("a"), "", "   ", row("b")])
    clips = read_manifest(path)
    assert [c.id for c in clips] == ["a", "b"]
    assert clips[0].audio == (folder / "audio" / "a.wav").resolve()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row(), "{not json"], r"manifest.jsonl:2: not valid JSON"),
        ([["a list"]], r":1: expected a JSON object, got list"),
        ([{k: v for k, v in row().items() if k != "text"}], r":1: missing field 'text'"),
        ([row(duration="long")], r":1: field 'duration' has the wrong type \(str\)"),
        ([row(duration=True)], r":1: field 'duration' has the wrong type \(bool\)"),
        ([row(audio="audio/missing.wav")], r":1: audio file not found: .*missing.wav"),
        ([row("a"), row("a")], r":2: duplicate clip id 'a'"),
    ],
)
def test_manifest_errors_say_where(folder, rows, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write_manifest(folder, rows))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------- normalizer


def test_normalizer_uses_the_shipped_spelling_map():
    assert normalize_text("The colour is grey.") == "the color is gray"
    assert normalize_text("I've organised the Centre") == "i have organized the center"


def test_normalizer_titles_numbers_and_fillers():
    assert normalize_text("Mr. Smith met Dr. Jones.") == "mister smith met doctor jones"
    assert normalize_text("Twenty-five dollars") == "$25"
    assert normalize_text("nineteen ninety-nine") == "1999"
    assert normalize_text("Hmm, uh, OK!") == "ok"


# ---------------------------------------------------------------------------------------------------- WER


def test_corpus_and_capped_mean_wer_by_hand():
    scores = wer_scores(
        ["The cat sat on the mat.", "Hello world", "Good morning"],
        ["the cat sat on a mat", "hello there big world", "good morning everyone it is a fine day"],
    )
    # 1 substitution of 6 words; 2 insertions over 2 words; 6 insertions over 2 words (300%, capped at 100%).
    assert [(u.errors, u.words) for u in scores.utterances] == [(1, 6), (2, 2), (6, 2)]
    assert [u.wer for u in scores.utterances] == pytest.approx([1 / 6, 1.0, 1.0])
    assert (scores.errors, scores.words) == (9, 10)
    assert scores.corpus_wer == pytest.approx(0.9)
    assert scores.mean_utterance_wer == pytest.approx((1 / 6 + 1 + 1) / 3)


def test_wer_ignores_what_the_normalizer_removes():
    scores = wer_scores(["The colour, Mr. Smith, is twenty-five."], ["the color mister smith is 25"])
    assert scores.corpus_wer == 0.0


def test_empty_normalized_references():
    # "uh" normalizes to nothing: an empty hypothesis is right, any word is one insertion over zero words.
    scores = wer_scores(["uh", "uh", "good day"], ["", "something", "good day"])
    assert [(u.errors, u.words, u.wer) for u in scores.utterances] == [(0, 0, 0.0), (1, 0, 1.0), (0, 2, 0.0)]
    assert scores.corpus_wer == pytest.approx(1 / 2)
    assert scores.mean_utterance_wer == pytest.approx(1 / 3)
    assert wer_scores([""], [""]).corpus_wer == 0.0
    assert wer_scores([""], ["words"]).corpus_wer == 1.0


def test_wer_argument_errors():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero utterances"):
        wer_scores([], [])


# ---------------------------------------------------------------------------------------------------- loops


@pytest.mark.parametrize(
    "text",
    [
        "Thank you. " * 10,
        "And so my fellow Americans ask not what your country can do for you. " * 3,
        "la " * 12,
        "It was a good day. " + "I went to the store and bought some milk, " * 4,
        "Some ordinary words at the start of the transcript, " * 1
        + " ".join(f"word{i}" for i in range(120))
        + " and then it goes on and on and on and on and on and on",
    ],
    ids=["thank-you", "sentence-x3", "single-word", "after-real-text", "late-in-a-long-text"],
)
def test_loops_are_detected(text):
    assert is_repetition_loop(text)


def test_compression_ratio_alone_catches_a_loop_that_is_not_back_to_back_late_in_a_long_text():
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    prefix = " ".join("".join(rng.choice(letters, 6)) for _ in range(300))  # incompressible words
    sentences = ["I went home.", "He went home.", "She stayed home."]
    text = prefix + " " + " ".join(sentences[i] for i in rng.permutation(np.arange(30) % 3))
    data = text.encode()
    assert len(data) / len(zlib.compress(data)) < 2.4  # over the whole text the loop does not show
    assert is_repetition_loop(text, min_repeats=1000)  # n-gram rule switched off
    assert not is_repetition_loop(text, min_repeats=1000, max_compression_ratio=100.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello world.",
        "No, no, no, that is not what I said.",
        "very very good",
        "Thank you. Thank you. Thank you.",
    ],
)
def test_ordinary_text_is_not_a_loop(text):
    assert not is_repetition_loop(text)


def test_no_reference_of_the_speech_set_is_a_loop(manifest_rows):
    flagged = [r["id"] for r in manifest_rows if is_repetition_loop(r["text"])]
    assert flagged == []


# ---------------------------------------------------------------------------------------------------- evaluate_models

# Clip lengths in samples identify the clip to the lookup engine.
CLIPS = [
    ("c1", CALIBRATION_SPEAKER, "The colour of the sky.", 8000),
    ("c2", CALIBRATION_SPEAKER, "Press one for sales.", 9600),
    ("c3", "jfk", "And so my fellow Americans", 11200),
]
SLOPPY = {
    8000: "the color of the sea",  # 1 substitution of 5 words
    9600: "Press one for sales. " + "for sales " * 10,  # 20 insertions over 4 words, a loop
    11200: "and so my fellow",  # 1 deletion of 5 words
}


@dataclass
class Transcript:
    text: str


class LookupEngine:
    """Returns a fixed transcript per clip, so that every number in the report can be computed by hand."""

    def __init__(self, name: str, encoder_parameters: int, texts: dict[int, str], latency: float) -> None:
        self.info = ModelInfo(name, "cpu", "float32", None, encoder_parameters, False, ("en",))
        self.texts = texts
        self.latency = latency
        self.batches: list[list[int]] = []
        self.options_seen: list[object] = []

    def transcribe(self, audios: list[np.ndarray], options: object) -> list[Transcript]:
        assert all(a.dtype == np.float32 and a.ndim == 1 for a in audios)
        self.batches.append([len(a) for a in audios])
        self.options_seen.append(options)
        return [Transcript(self.texts[len(a)]) for a in audios]

    def encoder_latency(self, batch_size: int, repeats: int) -> float:
        assert (batch_size, repeats) == (1, 2)
        return self.latency


@pytest.fixture
def clips(tmp_path: Path) -> list[Clip]:
    rows = []
    for clip_id, speaker, text, samples in CLIPS:
        sf.write(tmp_path / f"{clip_id}.wav", np.zeros(samples, dtype=np.float32), 16000, subtype="PCM_16")
        rows.append(
            row(clip_id, audio=f"{clip_id}.wav", text=text, duration=samples / 16000, speaker=speaker)
        )
    return read_manifest(write_manifest(tmp_path, rows))


@pytest.fixture
def engines() -> dict[str, LookupEngine]:
    return {
        "src/perfect": LookupEngine("perfect", 20_000_000, {s: t for _, _, t, s in CLIPS}, 0.010),
        "src/sloppy": LookupEngine("sloppy", 8_000_000, SLOPPY, 0.004),
    }


def test_evaluate_models_numbers_and_files(tmp_path, clips, engines):
    options = object()
    out = tmp_path / "report"
    report = evaluate_models(
        list(engines),
        clips,
        out,
        engine_factory=engines.__getitem__,
        options=options,
        batch_size=2,
        latency_repeats=2,
    )
    for engine in engines.values():
        assert engine.batches == [[8000, 9600], [11200]]  # manifest order, batches of at most 2
        assert all(o is options for o in engine.options_seen)

    data = json.loads(report.results_json.read_text())
    assert data["clips"] == 3
    assert data["audio_seconds"] == pytest.approx(28800 / 16000)
    perfect, sloppy = data["models"]
    assert (perfect["name"], perfect["source"], perfect["wer"], perfect["loops"]) == (
        "perfect",
        "src/perfect",
        0,
        0,
    )
    assert perfect["encoder_parameters"] == 20_000_000
    assert perfect["encoder_latency_seconds"] == 0.010

    assert (sloppy["errors"], sloppy["words"], sloppy["loops"]) == (22, 14, 1)
    assert sloppy["wer"] == pytest.approx(22 / 14)
    assert sloppy["mean_utterance_wer"] == pytest.approx((0.2 + 1.0 + 0.2) / 3)
    assert sloppy["groups"][CALIBRATION_SPEAKER] == pytest.approx(
        {"clips": 2, "wer": 21 / 9, "mean_utterance_wer": 0.6, "errors": 21, "words": 9}
    )
    assert sloppy["groups"]["other speakers"]["wer"] == pytest.approx(0.2)
    second = sloppy["per_clip"][1]
    assert (second["id"], second["speaker"], second["reference"]) == (
        "c2",
        CALIBRATION_SPEAKER,
        "Press one for sales.",
    )
    assert (second["errors"], second["words"], second["wer"], second["loop"]) == (20, 4, 1.0, True)
    assert second["normalized_reference"] == "press one for sales"
    assert [c["loop"] for c in sloppy["per_clip"]] == [False, True, False]

    assert [m.name for m in report.models] == ["perfect", "sloppy"]
    assert report.models[1].scores.corpus_wer == pytest.approx(22 / 14)

    table = report.results_md.read_text()
    assert table == report.markdown
    assert "| perfect | 20.00 | 10.0 | 0.00 | 0.00 | 0 | 0.00 | 0.00 |" in table
    assert "| sloppy | 8.00 | 4.0 | 157.14 | 46.67 | 1 | 233.33 | 20.00 |" in table

    assert report.pareto_png == out / "pareto.png"
    image = imread(report.pareto_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_latency_can_be_skipped_and_empty_groups_are_left_out(tmp_path, clips, engines):
    report = evaluate_models(
        ["src/sloppy"],
        clips,
        tmp_path,
        engine_factory=engines.__getitem__,
        groups={"all": lambda c: True, "nobody": lambda c: False},
        latency_repeats=None,
    )
    model = json.loads(report.results_json.read_text())["models"][0]
    assert model["encoder_latency_seconds"] is None
    assert list(model["groups"]) == ["all"]
    assert model["groups"]["all"]["wer"] == pytest.approx(22 / 14)
    assert "| sloppy | 8.00 | n/a | 157.14 | 46.67 | 1 | 157.14 | n/a |" in report.results_md.read_text()


def test_one_model_is_scored_without_writing_anything(tmp_path, clips, engines):
    before = sorted(tmp_path.iterdir())
    result = evaluate_model(
        "src/sloppy", clips, engine_factory=engines.__getitem__, groups={}, latency_repeats=None
    )
    assert (result.name, result.groups, result.encoder_latency_seconds) == ("sloppy", {}, None)
    assert result.scores.corpus_wer == pytest.approx(22 / 14) and result.loops == 1
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        evaluate_model("src/sloppy", clips, engine_factory=engines.__getitem__, batch_size=0)


def test_engine_returning_the_wrong_number_of_transcripts(tmp_path, clips, engines):
    engine = engines["src/perfect"]
    engine.transcribe = lambda audios, options: [Transcript("x")]
    with pytest.raises(LiteASRError, match="perfect returned 1 transcripts for 3 clips"):
        evaluate_models(["src/perfect"], clips, tmp_path, engine_factory=engines.__getitem__, batch_size=8)


def test_evaluate_argument_errors(tmp_path, clips, engines):
    with pytest.raises(ValueError, match="no models"):
        evaluate_models([], clips, tmp_path, engine_factory=engines.__getitem__)
    with pytest.raises(ValueError, match="no clips"):
        evaluate_models(["src/perfect"], [], tmp_path, engine_factory=engines.__getitem__)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        evaluate_models(["src/perfect"], clips, tmp_path, engine_factory=engines.__getitem__, batch_size=0)
