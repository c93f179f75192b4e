"""Upload decoding: every format and layout we promise, and a domain error with a useful message for each bad input."""

from __future__ import annotations

import gzip
import io
import struct
import wave
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import soxr
from helpers import handmade_wav

from liteasr.audio import MAX_SAMPLE_RATE, SAMPLE_RATE, decode_audio, load_audio
from liteasr.errors import AudioDecodeError, AudioError, AudioTooLongError

NOT_AUDIO = "not audio in a format we can read"


def sine(rate: int, seconds: float = 1.0, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def peak_frequency(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


def check_output(audio: np.ndarray) -> np.ndarray:
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert audio.flags.c_contiguous
    assert np.isfinite(audio).all()
    assert np.abs(audio).max(initial=0.0) <= 1.0
    return audio


@pytest.mark.parametrize(
    ("subtype", "tolerance"),
    [
        ("PCM_U8", 1 / 64),
        ("PCM_16", 1e-4),
        ("PCM_24", 1e-6),
        ("PCM_32", 1e-7),
        ("FLOAT", 0.0),
        ("DOUBLE", 1e-7),
    ],
)
def test_wav_sample_formats_decode_to_the_same_signal(subtype, tolerance):
    signal = sine(SAMPLE_RATE)
    audio = check_output(decode_audio(encode(signal, SAMPLE_RATE, "WAV", subtype)))
    assert len(audio) == len(signal)
    np.testing.assert_allclose(audio, signal, atol=tolerance)


def test_stdlib_wave_writer_16_bit():
    signal = sine(SAMPLE_RATE)
    pcm = np.round(signal * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    audio = check_output(decode_audio(buffer.getvalue()))
    np.testing.assert_allclose(audio, pcm / 32768, atol=1e-7)


def test_wave_format_extensible_with_eight_channels_is_averaged():
    levels = np.arange(1, 9, dtype=np.float32) / 16  # channel k holds the constant k/16
    frames = np.tile(levels, (SAMPLE_RATE // 2, 1))
    data = encode(frames, SAMPLE_RATE, "WAVEX", "PCM_16")
    assert struct.unpack_from("<H", data, 20)[0] == 0xFFFE  # WAVE_FORMAT_EXTENSIBLE
    audio = check_output(decode_audio(data))
    assert len(audio) == SAMPLE_RATE // 2
    np.testing.assert_allclose(audio, levels.mean(), atol=1e-4)


def test_stereo_is_the_mean_of_the_channels_not_the_first():
    left = sine(SAMPLE_RATE)
    audio = decode_audio(encode(np.stack([left, 0.5 * left], axis=1), SAMPLE_RATE, "WAV", "FLOAT"))
    np.testing.assert_allclose(audio, 0.75 * left, atol=1e-7)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 384000])
def test_resampling_keeps_frequency_amplitude_and_duration(rate):
    audio = check_output(decode_audio(encode(sine(rate, 2.0, 440.0), rate, "WAV", "FLOAT")))
    assert abs(len(audio) - 2 * SAMPLE_RATE) <= 1
    assert peak_frequency(audio) == pytest.approx(440.0, abs=1.0)
    middle = audio[SAMPLE_RATE // 2 : -SAMPLE_RATE // 2]  # away from the filter's edges
    assert np.abs(middle).max() == pytest.approx(0.5, abs=0.01)


def test_block_streaming_matches_one_shot_mixdown_and_resampling():
    """Several blocks plus a short tail: the streamed result must equal decoding everything at once."""
    rate = 44100
    rng = np.random.default_rng(0)
    frames = (rng.standard_normal((rate * 13 + 7, 2)) * 0.1).astype(np.float32)
    data = encode(frames, rate, "WAV", "FLOAT")
    expected = soxr.resample(frames.mean(axis=1, dtype=np.float32), rate, SAMPLE_RATE, quality="HQ")
    np.testing.assert_array_equal(decode_audio(data), expected)


@pytest.mark.parametrize("frames", [(1 << 18) - 1, 1 << 18, (1 << 18) + 1])
def test_lengths_around_a_block_boundary_are_exact(frames):
    signal = (np.random.default_rng(1).standard_normal(frames) * 0.1).astype(np.float32)
    np.testing.assert_array_equal(decode_audio(encode(signal, SAMPLE_RATE, "WAV", "FLOAT")), signal)


@pytest.mark.parametrize(
    ("fmt", "subtype", "length_slack"),
    [("FLAC", "PCM_16", 0), ("OGG", "VORBIS", 0), ("OGG", "OPUS", 0), ("MP3", "MPEG_LAYER_III", 2000)],
)
def test_compressed_formats(fmt, subtype, length_slack):
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) has no {fmt}/{subtype}")
    audio = check_output(decode_audio(encode(sine(SAMPLE_RATE, 2.0), SAMPLE_RATE, fmt, subtype)))
    assert abs(len(audio) - 2 * SAMPLE_RATE) <= length_slack
    assert peak_frequency(audio) == pytest.approx(440.0, abs=1.0)


def test_flac_at_44_1_khz_is_resampled():
    audio = decode_audio(encode(sine(44100, 1.0, 1000.0), 44100, "FLAC"))
    assert len(audio) == SAMPLE_RATE
    assert peak_frequency(audio) == pytest.approx(1000.0, abs=1.0)


def test_empty_input():
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(b"")


@pytest.mark.parametrize(
    "data",
    [
        b"This is a plain text file, not audio.\n" * 20,
        b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).bytes(500),
        gzip.compress(b"some text " * 100),
        np.random.default_rng(3).bytes(10_000),
        b"\xff\xfb\x90\x44" + np.random.default_rng(4).bytes(5000),  # an MP3 sync word followed by garbage
        b"{}",
    ],
    ids=["text", "png", "gzip", "random", "mp3-sync-then-garbage", "json"],
)
def test_not_audio(data):
    with pytest.raises(AudioDecodeError, match=NOT_AUDIO) as caught:
        decode_audio(data)
    assert "BytesIO" not in str(caught.value)
    assert "0x" not in str(caught.value)


def test_header_only_wav_is_valid_empty_audio():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
    audio = check_output(decode_audio(buffer.getvalue()))
    assert audio.shape == (0,)


def test_riff_and_data_sizes_that_lie_still_read_the_samples_present():
    pcm = (np.arange(-500, 500) * 30).astype("<i2")
    expected = pcm / np.float32(32768)
    for riff_size, data_size in [(0xFFFFFFFF, 0xFFFFFFFF), (4, None), (None, 10**9), (10**9, 0)]:
        audio = decode_audio(handmade_wav(pcm.tobytes(), riff_size=riff_size, data_size=data_size))
        if data_size == 0:
            # A data chunk that says it is empty is believed: zero samples, not an error.
            assert audio.shape == (0,)
        else:
            np.testing.assert_array_equal(audio, expected)


def test_truncated_wav_reads_what_is_there():
    pcm = (np.arange(1000) * 20).astype("<i2")
    data = handmade_wav(pcm.tobytes())[: 44 + 2 * 600 + 1]  # cut in the middle of sample 601
    np.testing.assert_array_equal(decode_audio(data), pcm[:600] / np.float32(32768))


def test_wav_cut_inside_the_header():
    with pytest.raises(AudioDecodeError, match="malformed"):
        decode_audio(handmade_wav(b"\x00" * 100)[:30])


def test_zero_channels():
    with pytest.raises(AudioDecodeError, match="[Cc]hannel count is zero"):
        decode_audio(handmade_wav(b"\x00" * 100, channels=0))


def test_unsupported_wav_codec_says_so():
    with pytest.raises(AudioDecodeError, match="malformed or unsupported"):
        decode_audio(handmade_wav(b"\x00" * 100, bits=0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_samples_are_rejected(bad):
    signal = sine(SAMPLE_RATE)
    signal[1234] = bad
    with pytest.raises(AudioDecodeError, match="NaN or infinite"):
        decode_audio(encode(signal, SAMPLE_RATE, "WAV", "FLOAT"))


def test_float_samples_beyond_full_scale_are_clipped():
    signal = np.array([0.25, 1.5, -3.0, -0.5], dtype=np.float32)
    np.testing.assert_array_equal(
        decode_audio(encode(signal, SAMPLE_RATE, "WAV", "FLOAT")), [0.25, 1, -1, -0.5]
    )


@pytest.mark.parametrize("rate", [1, 999, MAX_SAMPLE_RATE + 1, 2**31 - 1])
def test_absurd_sample_rates_are_refused(rate):
    with pytest.raises(AudioDecodeError, match=f"unsupported sample rate {rate} Hz"):
        decode_audio(handmade_wav(b"\x00\x01" * 1000, rate=rate))


def test_sample_rate_zero():
    with pytest.raises(AudioDecodeError):
        decode_audio(handmade_wav(b"\x00\x01" * 1000, rate=0))


def test_lowest_and_highest_supported_rates_decode():
    for rate, seconds in [(1000, 1.0), (MAX_SAMPLE_RATE, 0.25)]:
        audio = decode_audio(encode(sine(rate, seconds, 100.0), rate, "WAV", "FLOAT"))
        assert abs(len(audio) - seconds * SAMPLE_RATE) <= 1
        assert peak_frequency(audio) == pytest.approx(100.0, abs=4.0)


def test_max_seconds():
    data = encode(sine(SAMPLE_RATE, 2.0), SAMPLE_RATE, "FLAC")
    assert len(decode_audio(data, max_seconds=2.0)) == 2 * SAMPLE_RATE
    with pytest.raises(AudioTooLongError, match=r"2\.0 s long; the limit is 1\.5 s"):
        decode_audio(data, max_seconds=1.5)


def flac_claiming(seconds: float) -> bytes:
    """A real 2 s FLAC whose STREAMINFO says it holds `seconds` of audio."""
    data = bytearray(encode(sine(SAMPLE_RATE, 2.0), SAMPLE_RATE, "FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # first metadata block is STREAMINFO
    offset = (
        8 + 10
    )  # past the block header and the block/frame size fields: rate(20) channels(3) bits(5) total(36)
    packed = int.from_bytes(data[offset : offset + 8], "big")
    packed = (packed & ~(2**36 - 1)) | round(seconds * SAMPLE_RATE)
    data[offset : offset + 8] = packed.to_bytes(8, "big")
    return bytes(data)


def test_duration_limit_is_checked_on_the_header_before_decoding():
    """The data holds 2 s, so only a check of the header's 10 h can raise here."""
    with pytest.raises(AudioTooLongError, match=r"36000\.0 s long; the limit is 600 s"):
        decode_audio(flac_claiming(10 * 3600), max_seconds=600)


def test_a_header_that_claims_more_than_the_data_holds_is_a_clear_error_without_a_limit():
    with pytest.raises(AudioDecodeError, match="FLAC audio is corrupt or truncated"):
        decode_audio(flac_claiming(10 * 3600))


def test_corrupt_flac_body():
    data = bytearray(encode(sine(SAMPLE_RATE, 2.0), SAMPLE_RATE, "FLAC"))
    data[len(data) // 3 : len(data) // 3 + 300] = np.random.default_rng(5).bytes(300)
    with pytest.raises(AudioDecodeError, match="corrupt or truncated"):
        decode_audio(bytes(data))


@pytest.mark.filterwarnings("error")  # nor a warning, nor an exception printed from a libsndfile callback
def test_mutated_files_raise_only_domain_errors():
    """Random byte flips and cuts of valid files: decoded audio or an AudioError, never anything else."""
    rng = np.random.default_rng(6)
    signal = sine(SAMPLE_RATE, 0.5)
    seeds = [
        encode(signal, SAMPLE_RATE, "WAV", "PCM_16"),
        encode(np.stack([signal, signal], axis=1), SAMPLE_RATE, "WAV", "FLOAT"),
        encode(signal, SAMPLE_RATE, "FLAC"),
        encode(signal, SAMPLE_RATE, "OGG", "VORBIS"),
        encode(signal, SAMPLE_RATE, "AIFF", "PCM_16"),
    ]
    outcomes: Counter[str] = Counter()
    for i in range(300):
        data = bytearray(seeds[i % len(seeds)])
        if i % 3 == 2:
            data = data[: rng.integers(0, len(data))]
        else:
            span = 200 if i % 3 == 0 else len(data)  # headers, or anywhere
            for _ in range(rng.integers(1, 20)):
                data[rng.integers(0, min(span, len(data)))] = rng.integers(0, 256)
        try:
            check_output(decode_audio(bytes(data), max_seconds=None if i % 2 else 30))
        except AudioError:
            outcomes["error"] += 1
        else:
            outcomes["audio"] += 1
    assert outcomes["audio"] > 30 and outcomes["error"] > 30  # both paths were exercised


def test_load_audio_reads_a_clip_of_the_speech_set(clip_path, manifest_rows):
    row = next(r for r in manifest_rows if r["id"] == "asterisk_agent-alreadyon")
    audio = check_output(load_audio(clip_path(row["id"])))
    assert len(audio) / SAMPLE_RATE == pytest.approx(row["duration"], abs=0.01)
    assert np.abs(audio).max() > 0.05


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioDecodeError, match="missing.wav: cannot read the file"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="empty.wav: the audio is empty"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.txt").write_text("hello " * 100)
    with pytest.raises(AudioDecodeError, match=NOT_AUDIO):
        load_audio(tmp_path / "notes.txt")
