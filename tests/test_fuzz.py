"""Property-based fuzzing of the upload decoding path (`liteasr.audio.decode_audio`).

The property, for any bytes: decoding returns 16 kHz mono float32 samples that are finite, within [-1, 1] and no
longer than the duration limit allows, or it raises an `AudioError` (which the service answers with 4xx). Anything
else (ValueError, MemoryError, a crash in a C library, an exception printed from a libsndfile callback) would be a
5xx or worse. Three generators feed it: arbitrary bytes (with and without a format's magic number), mutations of
valid WAV/FLAC/OGG/AIFF/MP3 files, and WAV headers synthesized field by field.

The runs here are short and derandomized (a fixed sequence of examples, seconds in `make test`);
`bench/fuzz_uploads.py` runs the same properties, from this module, for minutes with fresh random seeds and also
sends fuzzed multipart bodies to a real server.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liteasr.audio import SAMPLE_RATE, decode_audio
from liteasr.errors import AudioError

__all__ = [
    "MAGICS",
    "arbitrary_bytes",
    "check_decode",
    "max_seconds_values",
    "mutated_files",
    "seed_files",
    "synthesized_wavs",
]

SHORT = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples every run: make test stays reproducible; the bench explores
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Output samples the resampler may add past `max_seconds` (its flush at the end of the stream).
RESAMPLER_SLACK = 64

# Magic numbers of the formats libsndfile sniffs, so random tails reach each format's header parser.
MAGICS = [
    b"RIFF",
    b"RIFX",
    b"RF64",
    b"fLaC",
    b"OggS",
    b"ID3\x03\x00\x00\x00\x00\x00\x00",
    b"\xff\xfb\x90\x44",
    b"FORM\x00\x00\x10\x00AIFF",
    b"FORM\x00\x00\x10\x00AIFC",
    b".snd",
    b"caff\x00\x01\x00\x00",
    b"riff.\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00",  # Wave64
    b"NIST_1A\n   1024\n",
    b"Creative Voice File\x1a",
    b"MATLAB 5.0",
]

# fmt: off
INTERESTING_U32 = [0, 1, 2, 3, 7, 8, 16, 0x7F, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
# fmt: on


def check_decode(data: bytes, max_seconds: float | None) -> str:
    """The property. Returns "audio" or "error" so that callers can count which path an example took."""
    try:
        audio = decode_audio(data, max_seconds=max_seconds)
    except AudioError as error:
        message = str(error)
        assert message, "an AudioError without a message"
        assert "BytesIO" not in message and "_QuietSeek" not in message, message
        return "error"
    assert isinstance(audio, np.ndarray)
    assert audio.dtype == np.float32, audio.dtype
    assert audio.ndim == 1, audio.shape
    assert np.isfinite(audio).all()
    assert np.abs(audio).max(initial=0.0) <= 1.0
    if max_seconds is not None:
        assert len(audio) <= max_seconds * SAMPLE_RATE + RESAMPLER_SLACK, (len(audio), max_seconds)
    return "audio"


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@functools.cache
def seed_files() -> tuple[bytes, ...]:
    """Small valid files in every layout the decoder meets most: the material the mutations start from."""
    t = np.arange(4000) / 8000
    mono = (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    stereo = np.stack([mono, -mono], axis=1)
    seeds = [
        _encode(mono, 8000, "WAV", "PCM_16"),
        _encode(mono, 8000, "WAV", "PCM_U8"),
        _encode(stereo, 8000, "WAV", "FLOAT"),
        _encode(mono, 22050, "WAV", "PCM_24"),
        _encode(np.tile(mono[:, None], (1, 6)), 8000, "WAVEX", "PCM_16"),
        _encode(mono, 8000, "WAV", "IMA_ADPCM"),
        _encode(mono, 8000, "WAV", "ULAW"),
        _encode(mono, 16000, "FLAC", "PCM_16"),
        _encode(stereo, 44100, "FLAC", "PCM_24"),
        _encode(mono, 8000, "AIFF", "PCM_16"),
        _encode(mono, 8000, "AU", "PCM_16"),
        _encode(mono, 16000, "OGG", "VORBIS"),
    ]
    for fmt, subtype in [("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III")]:
        if fmt in sf.available_formats() and subtype in sf.available_subtypes(fmt):
            seeds.append(_encode(np.tile(mono, 2), 16000, fmt, subtype))
    return tuple(seeds)


max_seconds_values = st.sampled_from([None, 600.0, 30.0, 1.0, 0.01])


@st.composite
def arbitrary_bytes(draw) -> bytes:
    tail = draw(st.binary(min_size=0, max_size=4096))
    if draw(st.booleans()):
        return draw(st.sampled_from(MAGICS)) + tail
    return tail


@st.composite
def mutated_files(draw) -> bytes:
    """A valid seed file with a few byte flips, cuts, insertions, deletions or rewritten header fields."""
    data = bytearray(draw(st.sampled_from(seed_files())))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "field", "field"]))
        # Headers are where the parsers decide what to allocate and how far to read: favour them.
        near_header = draw(st.booleans())
        limit = min(len(data), 128) if near_header else len(data)
        pos = draw(st.integers(0, limit - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:  # a 16- or 32-bit field, either byte order, set to an edge value
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, 2**32 - 1)) % (1 << (8 * width))
            order = draw(st.sampled_from(["little", "big"]))
            data[pos : pos + width] = value.to_bytes(width, order)
    return bytes(data)


def _mostly(draw, sane: st.SearchStrategy, odd: st.SearchStrategy):
    """A sane value three times in four, so that many files get deep into decoding; else an odd one."""
    return draw(sane if draw(st.integers(0, 3)) else odd)


@st.composite
def synthesized_wavs(draw) -> bytes:
    """A RIFF/WAVE file written field by field, every field free to disagree with the others and the data."""
    u16, u32 = st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
    tag = _mostly(draw, st.sampled_from([1, 3, 6, 7, 0xFFFE]), st.sampled_from([2, 0x11, 0x31, 0x55]) | u16)
    channels = _mostly(draw, st.integers(1, 8), st.sampled_from([0, 255, 256, 1024, 0xFFFF]) | u16)
    rate = _mostly(
        draw,
        st.sampled_from([1000, 8000, 16000, 22050, 44100, 48000, 96000, 384000, 768000]),
        st.sampled_from([0, 1, 999, 768001, 2**31 - 1, 2**32 - 1]) | u32,
    )
    bits = _mostly(draw, st.sampled_from([8, 16, 24, 32, 64]), st.sampled_from([0, 1, 4, 12, 20, 48]) | u16)
    block_align = _mostly(draw, st.just(channels * bits // 8 % 0x10000), st.sampled_from([0, 1]) | u16)
    byte_rate = _mostly(draw, st.just(rate * block_align % 2**32), st.just(0) | u32)
    fmt = struct.pack("<HHIIHH", tag, channels, rate, byte_rate, block_align, bits)
    if tag == 0xFFFE:  # cbSize 22: valid bits, channel mask, the sub-format GUID (PCM or float, or garbage)
        sub = _mostly(draw, st.sampled_from([1, 3]), u16)
        guid = struct.pack("<H", sub) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        extension = struct.pack("<HI", bits, draw(u32)) + _mostly(draw, st.just(guid), st.binary(max_size=16))
        fmt += struct.pack("<H", len(extension)) + extension
    elif draw(st.booleans()):
        extension = draw(st.binary(max_size=24))
        fmt += struct.pack("<H", len(extension)) + extension
    fmt_size = _mostly(draw, st.just(len(fmt)), st.sampled_from([16, 18, 40, 0]) | u32)
    data = draw(st.binary(min_size=0, max_size=2048))
    data_size = _mostly(draw, st.just(len(data)), st.sampled_from([0, 0xFFFFFFFF, 0x7FFFFFFF]) | u32)
    chunks = b"fmt " + struct.pack("<I", fmt_size) + fmt
    if draw(st.booleans()):  # an extra chunk before the data: fact, LIST, or a made-up one with any size
        name = draw(st.sampled_from([b"fact", b"LIST", b"JUNK", b"cue ", b"\x00\x00\x00\x00"]))
        body = draw(st.binary(min_size=0, max_size=64))
        size = _mostly(draw, st.just(len(body)), st.just(0xFFFFFFFF) | u32)
        chunks += name + struct.pack("<I", size) + body
    chunks += b"data" + struct.pack("<I", data_size) + data
    riff_size = _mostly(draw, st.just(len(chunks) + 4), st.sampled_from([0, 0xFFFFFFFF]) | u32)
    magic = _mostly(draw, st.just(b"RIFF"), st.sampled_from([b"RF64", b"RIFX"]))
    return magic + struct.pack("<I", riff_size) + b"WAVE" + chunks


# -- the short runs of make test ----------------------------------------------------------------------------


@pytest.fixture
def no_callback_noise(capfd):
    """Exceptions raised inside cffi callbacks are printed, not raised: the stderr must stay clean."""
    yield
    err = capfd.readouterr().err
    assert "callback" not in err and "Traceback" not in err, err


@SHORT
@given(data=arbitrary_bytes(), max_seconds=max_seconds_values)
def test_arbitrary_bytes(data, max_seconds, no_callback_noise):
    check_decode(data, max_seconds)


@SHORT
@given(data=mutated_files(), max_seconds=max_seconds_values)
def test_mutated_files(data, max_seconds, no_callback_noise):
    check_decode(data, max_seconds)


@SHORT
@given(data=synthesized_wavs(), max_seconds=max_seconds_values)
def test_synthesized_wav_headers(data, max_seconds, no_callback_noise):
    check_decode(data, max_seconds)


def test_the_generators_reach_both_outcomes():
    """Guards the fuzzers' usefulness: each one must produce decodable audio and errors, not only one of them."""
    counts = {}
    for name, strategy in [("mutated", mutated_files()), ("synthesized", synthesized_wavs())]:
        outcomes: list[str] = []

        @settings(SHORT, max_examples=150)
        @given(data=strategy)
        def run(data):
            outcomes.append(check_decode(data, 600.0))  # noqa: B023 (run() is called at once, in the loop)

        run()
        counts[name] = (outcomes.count("audio"), outcomes.count("error"))
    for audio, errors in counts.values():
        assert audio >= 10 and errors >= 10, counts


# -- what the long runs found (bench/fuzz_uploads.py), kept as regressions ------------------------------------


def _float_wav(frames: np.ndarray, rate: int) -> bytes:
    return _encode(frames.astype(np.float32), rate, "WAV", "FLOAT")


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
@pytest.mark.parametrize("channels", [1, 2])
def test_huge_finite_float_samples_are_clipped_not_turned_into_nan(rate, channels):
    """Found by the fuzzer: a float WAV whose samples were finite but near float32's maximum (8e37) came out of
    the resampler as NaN (and a stereo mixdown of such samples overflowed to inf). They are full-scale audio."""
    peak = np.finfo(np.float32).max
    signal = np.tile(np.repeat([peak, -peak, 0.5 * peak, 0.25], 200), 5)  # slow steps: survive the low-pass
    frames = np.stack([signal] * channels, axis=1) if channels > 1 else signal
    assert check_decode(_float_wav(frames, rate), None) == "audio"
    audio = decode_audio(_float_wav(frames, rate))
    assert np.abs(audio).max() > 0.5
