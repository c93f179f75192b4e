"""Uploaded bytes -> 16 kHz mono float32, the only input the engine accepts.

Everything goes through libsndfile (via soundfile): WAV in any PCM/float layout, FLAC, OGG/Vorbis/Opus, MP3 and the
other formats it recognises. The decoder streams: it reads fixed-size blocks, mixes each down to mono and resamples it
with a soxr stream, so memory follows the decoded output and never a number written in a header. A duration limit is
checked against the header's frame count before any sample is decoded; that is enough, because soundfile never reads
past the count the header gives. Every failure leaves as `AudioDecodeError` or `AudioTooLongError` with a message fit
for a client.

Samples are clipped to [-1, 1]: integer PCM already is, and for float files this is what openai-whisper's own
ffmpeg -> s16le path does; it also keeps the log-mel power finite. They are clipped as read, before the mixdown and
the resampler, and once more at the end (the resampler's filter can overshoot full scale slightly).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from liteasr.errors import AudioDecodeError, AudioTooLongError

__all__ = [
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "SAMPLE_RATE",
    "WINDOW_SECONDS",
    "Window",
    "decode_audio",
    "load_audio",
    "split_windows",
]

SAMPLE_RATE = 16000
# One Whisper window: the encoder sees 30 s, padded with silence when shorter.
WINDOW_SECONDS = 30.0
# Below 1 kHz nothing of speech survives, and each input byte would expand to many output samples.
MIN_SAMPLE_RATE = 1000
# The highest rate common hardware records at; above it a header is more likely garbage than audio.
MAX_SAMPLE_RATE = 768000

_BLOCK_SAMPLES = 1 << 18  # samples (frames x channels) read per block: 1 MiB of float32
_SF_ERR_UNRECOGNISED_FORMAT = 1
# What libsndfile says for garbage after an MP3 sync word; its text ("not a regular file") would mislead.
_SF_ERR_NOT_REGULAR_FILE = 7


def decode_audio(data: bytes, *, max_seconds: float | None = None) -> np.ndarray:
    """Decode an upload; a valid file with no frames gives an empty array and the caller decides what that means."""
    if not data:
        raise AudioDecodeError("the audio is empty (0 bytes)")
    return _decode(io.BytesIO(data), max_seconds)


def load_audio(path: str | os.PathLike[str], *, max_seconds: float | None = None) -> np.ndarray:
    """Decode a local file, streaming it from disk rather than reading it into memory first."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise AudioDecodeError(f"{os.fspath(path)}: the audio is empty (0 bytes)")
            return _decode(file, max_seconds)
    except OSError as e:
        raise AudioDecodeError(f"{os.fspath(path)}: cannot read the file ({e.strerror})") from None


class _QuietSeek:
    """libsndfile probes impossible offsets in malformed files, and an exception raised inside its seek callback
    is only printed; a failed seek that leaves the position unchanged is what it expects of a failing lseek."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def readinto(self, buffer: memoryview) -> int:
        return self._file.readinto(buffer)  # type: ignore[attr-defined]

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._file.seek(offset, whence)
        except (OSError, ValueError, OverflowError):
            return self._file.tell()


def _decode(file: BinaryIO, max_seconds: float | None) -> np.ndarray:
    try:
        sound = sf.SoundFile(_QuietSeek(file))
    except sf.LibsndfileError as e:
        raise AudioDecodeError(_open_error_message(e)) from None
    with sound:
        rate, channels = sound.samplerate, sound.channels
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise AudioDecodeError(
                f"unsupported sample rate {rate} Hz: must be {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
            )
        if max_seconds is not None and sound.frames / rate > max_seconds:
            raise AudioTooLongError(
                f"the audio is {sound.frames / rate:.1f} s long; the limit is {max_seconds:g} s"
            )
        try:
            return _read_mono_16k(sound, rate, channels)
        except sf.LibsndfileError as e:
            raise AudioDecodeError(
                f"the {sound.format} audio is corrupt or truncated ({e.error_string.rstrip('.')})"
            ) from None


def _read_mono_16k(sound: sf.SoundFile, rate: int, channels: int) -> np.ndarray:
    block_frames = max(1, _BLOCK_SAMPLES // channels)
    buffer = np.empty((block_frames, channels), dtype=np.float32)
    stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32", "HQ")
    pieces: list[np.ndarray] = []
    while True:
        block = sound.read(block_frames, dtype="float32", always_2d=True, out=buffer)
        if not np.isfinite(block).all():
            raise AudioDecodeError("the audio contains NaN or infinite samples")
        # Clipped before the mixdown and the resampler: finite float samples near float32's maximum would
        # overflow either of them into inf or NaN.
        np.clip(block, -1.0, 1.0, out=block)
        mono = block[:, 0].copy() if channels == 1 else block.mean(axis=1, dtype=np.float32)
        last = len(block) < block_frames
        pieces.append(mono if stream is None else stream.resample_chunk(mono, last=last))
        if last:
            break
    audio = np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32)
    np.clip(audio, -1.0, 1.0, out=audio)
    return audio


def _open_error_message(error: sf.LibsndfileError) -> str:
    if error.code in (_SF_ERR_UNRECOGNISED_FORMAT, _SF_ERR_NOT_REGULAR_FILE):
        return "the data is not audio in a format we can read (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...)"
    if "SF_INFO struct incomplete" in error.error_string:  # libsndfile: "Internal error" (e.g. a 0 Hz rate)
        return "the audio file is malformed: its header gives no sample rate or no channel count"
    return f"the audio file is malformed or unsupported ({error.error_string.rstrip('.')})"


@dataclass(frozen=True)
class Window:
    """A piece of at most 30 s of one audio, `offset` seconds from its start."""

    offset: float
    samples: np.ndarray


def split_windows(
    audio: np.ndarray, *, window_seconds: float = WINDOW_SECONDS, search_seconds: float = 5.0
) -> list[Window]:
    """Cut audio into windows of at most `window_seconds`, each ending at the quietest 20 ms near its end.

    Cutting at a pause instead of at exactly 30 s keeps words whole, and unlike openai-whisper's seek loop
    every window is known up front, so all of them can be decoded side by side.
    """
    window = int(window_seconds * SAMPLE_RATE)
    if len(audio) <= window:
        return [Window(0.0, audio)]
    frame = SAMPLE_RATE // 50
    search = int(search_seconds * SAMPLE_RATE)
    windows, start = [], 0
    while len(audio) - start > window:
        lo = start + window - search
        region = audio[lo : start + window]
        n_frames = len(region) // frame
        energy = np.square(region[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
        # The last quietest frame: prefer cutting late, so windows stay long.
        quietest = n_frames - 1 - int(np.argmin(energy[::-1]))
        cut = lo + quietest * frame + frame // 2
        windows.append(Window(start / SAMPLE_RATE, audio[start:cut]))
        start = cut
    windows.append(Window(start / SAMPLE_RATE, audio[start:]))
    return windows
