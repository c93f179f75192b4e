"""The transcription engine: windowing and loop detection on synthetic input, decoding on the real tiny.en."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liteasr.audio import SAMPLE_RATE, Window, load_audio, split_windows
from liteasr.decoding import DecodeOptions, LoopGuard, Segment, WindowResult, find_repetition, stitch
from liteasr.engine import Engine, resolve_bf16
from liteasr.errors import InvalidOptionError
from liteasr.evaluate import normalize_text, wer_scores

JFK = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def test_find_repetition_finds_trailing_loops_only():
    assert find_repetition([1, 2, 3, 7, 7, 7, 7]) == 3
    assert find_repetition([5, 1, 2, 1, 2, 1, 2, 1, 2]) == 1
    assert find_repetition([1, 2, 1, 2, 1, 2, 9]) is None  # the loop ended: the model recovered
    assert find_repetition([1, 2, 3, 4, 5, 6]) is None
    assert find_repetition([4, 4, 4], min_repeats=4) is None


def test_the_temperature_ladder_starts_where_asked():
    guard = LoopGuard()
    assert DecodeOptions().ladder(guard) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert DecodeOptions(temperature=0.5).ladder(guard) == (0.5, 0.6, 0.8, 1.0)
    assert DecodeOptions(temperature=1.0).ladder(guard) == (1.0,)
    assert DecodeOptions(temperature=0.3).ladder(LoopGuard(enabled=False)) == (0.3,)


def test_split_windows_cuts_at_quiet_points_and_covers_the_audio():
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.3, 75 * SAMPLE_RATE).astype(np.float32)
    quiet = [27.0, 55.5]
    for second in quiet:  # 200 ms pauses just before each 30 s limit
        audio[int(second * SAMPLE_RATE) : int((second + 0.2) * SAMPLE_RATE)] = 0.0
    windows = split_windows(audio)
    assert len(windows) == 3
    assert all(len(w.samples) <= 30 * SAMPLE_RATE for w in windows)
    assert np.array_equal(np.concatenate([w.samples for w in windows]), audio)
    for window, second in zip(windows[1:], quiet, strict=True):
        assert second <= window.offset <= second + 0.2


def test_split_windows_keeps_short_audio_whole():
    audio = np.zeros(10 * SAMPLE_RATE, dtype=np.float32)
    [window] = split_windows(audio)
    assert window.offset == 0.0 and len(window.samples) == len(audio)


def test_stitch_shifts_segment_times_and_keeps_order():
    def result(text: str, start: float, end: float) -> WindowResult:
        segment = Segment(start, end, text)
        return WindowResult(
            text=text,
            language="en",
            segments=(segment,),
            tokens=(),
            avg_logprob=-0.1,
            compression_ratio=1.0,
            no_speech_prob=0.0,
            temperature=0.0,
            looped=False,
        )

    windows = [Window(0.0, np.zeros(1)), Window(28.5, np.zeros(1))]
    joined = stitch(windows, [result("first part", 1.0, 3.0), result("second part", 0.5, 2.0)], 40.0)
    assert joined.text == "first part second part"
    assert [(s.start, s.end) for s in joined.segments] == [(1.0, 3.0), (29.0, 30.5)]
    assert joined.windows == 2 and joined.duration == 40.0


@pytest.fixture(scope="module")
def engine(tiny_en_dir) -> Engine:
    return Engine.load(tiny_en_dir, device="cpu")


@pytest.mark.real
def test_jfk_transcribes_to_the_known_sentence(engine, clip_path):
    [result] = engine.transcribe([load_audio(clip_path("jfk"))])
    assert normalize_text(result.text) == normalize_text(JFK)
    assert result.language == "en"
    assert result.duration == pytest.approx(11.0, abs=0.01)


@pytest.mark.real
def test_int8_engine_transcribes_jfk(tiny_en_dir, clip_path):
    int8 = Engine.load(tiny_en_dir, device="cpu", int8="decoder")
    assert int8.info.quantization == "int8-decoder" and int8.info.encoder_parameters == 7_632_384
    [result] = int8.transcribe([load_audio(clip_path("jfk"))])
    assert normalize_text(result.text) == normalize_text(JFK)


@pytest.mark.real
def test_bf16_encoder_engine_transcribes_jfk(tiny_en_dir, clip_path):
    engine = Engine.load(tiny_en_dir, device="cpu", int8="decoder", bf16="encoder")
    assert engine.info.encoder_dtype == "bfloat16" and engine.info.dtype == "float32"
    assert engine.encode([np.zeros(SAMPLE_RATE, dtype=np.float32)]).dtype == torch.float32  # for the decoder
    [result] = engine.transcribe([load_audio(clip_path("jfk"))])
    assert normalize_text(result.text) == normalize_text(JFK)


def test_bf16_auto_means_the_encoder_where_the_cpu_has_amx(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert resolve_bf16("auto", cpu, "decoder") == ("encoder" if amx else None)
        assert resolve_bf16("auto", cpu, "all") is None  # int8 covers the encoder
        assert resolve_bf16("auto", cuda, None) is None  # float16 throughout
    assert resolve_bf16("encoder", cpu, None) == "encoder"
    assert resolve_bf16("off", cpu, None) is None and resolve_bf16(None, cpu, None) is None
    for device, int8 in ((cuda, None), (cpu, "all")):
        with pytest.raises(InvalidOptionError, match="bfloat16 encoder runs on the CPU"):
            resolve_bf16("encoder", device, int8)
    with pytest.raises(InvalidOptionError, match="expected auto, off or encoder"):
        resolve_bf16("decoder", cpu, None)


@pytest.mark.real
def test_timestamps_cover_the_speech(engine, clip_path):
    [result] = engine.transcribe([load_audio(clip_path("jfk"))], DecodeOptions(timestamps=True))
    assert len(result.segments) >= 2
    assert all(0.0 <= s.start < s.end <= 11.0 for s in result.segments)
    assert [s.start for s in result.segments] == sorted(s.start for s in result.segments)
    assert normalize_text(" ".join(s.text for s in result.segments)) == normalize_text(JFK)


@pytest.mark.real
def test_long_audio_transcribes_end_to_end(engine, manifest_rows, clip_path):
    row = max((r for r in manifest_rows if r["split"] == "long"), key=lambda r: r["duration"])
    [result] = engine.transcribe([load_audio(clip_path(row["id"]))], DecodeOptions(timestamps=True))
    assert result.windows == 3
    assert result.segments[-1].end > 60.0
    assert wer_scores([row["text"]], [result.text]).corpus_wer < 0.15


@pytest.mark.real
def test_english_only_model_refuses_other_languages_and_translation(engine):
    with pytest.raises(InvalidOptionError, match="English-only"):
        engine.check_options(DecodeOptions(language="de"))
    with pytest.raises(InvalidOptionError, match="cannot translate"):
        engine.check_options(DecodeOptions(task="translate"))
    engine.check_options(DecodeOptions(language="en"))


@pytest.mark.real
def test_silence_gives_no_text(engine):
    [result] = engine.transcribe([np.zeros(5 * SAMPLE_RATE, dtype=np.float32)])
    assert result.text == ""


@pytest.mark.real
def test_loop_guard_stops_a_loop(tiny_en_dir, clip_path):
    """Plain greedy decoding of this audio repeats itself to the token limit; the guard ends the loop."""
    jfk = load_audio(clip_path("jfk"))
    audio = np.tile(jfk[int(5.5 * SAMPLE_RATE) : int(6.6 * SAMPLE_RATE)], 6)  # "your country" six times
    plain = Engine.load(tiny_en_dir, device="cpu", guard=LoopGuard(enabled=False))
    [looped] = plain.transcribe([audio])
    assert find_repetition(plain.tokenizer.encode(looped.text, add_special_tokens=False)) is not None

    guarded = Engine.load(tiny_en_dir, device="cpu")
    [result] = guarded.transcribe([audio])
    assert result.loops == 1
    assert find_repetition(guarded.tokenizer.encode(result.text, add_special_tokens=False)) is None
    assert len(result.text) < len(looped.text)


@pytest.mark.real
def test_multilingual_batch_mixes_languages_and_tasks(base_dir, clip_path):
    engine = Engine.load(base_dir, device="cpu")
    jfk = load_audio(clip_path("jfk"))
    options = [
        DecodeOptions(),
        DecodeOptions(language="de"),
        DecodeOptions(task="translate"),
        DecodeOptions(prompt="Kennedy's inaugural address, 1961.", words=True),  # language detected first
    ]
    detected, german, translated, prompted = engine.transcribe_windows([jfk] * 4, options)
    assert detected.language == "en" and normalize_text(detected.text) == normalize_text(JFK)
    assert prompted.language == "en" and normalize_text(prompted.text) == normalize_text(JFK)
    assert [w.text.strip(" ,.") for w in prompted.words][:4] == ["And", "so", "my", "fellow"]
    assert german.language == "de" and german.text.startswith("Und so")
    assert translated.language == "en" and "your country" in translated.text
    with pytest.raises(InvalidOptionError, match="unknown language"):
        engine.check_options(DecodeOptions(language="xx"))
