"""Domain errors of the library. The service maps each class to one HTTP status at its edge."""

from __future__ import annotations


class LiteASRError(Exception):
    """Base class: every error the library raises on purpose."""


class CheckpointError(LiteASRError):
    """A model source cannot be found, read or converted."""


class AudioError(LiteASRError):
    """Uploaded audio cannot be used."""


class AudioDecodeError(AudioError):
    """The bytes are not audio in any format we can decode, or the audio is corrupt."""


class AudioTooLongError(AudioError):
    """The decoded audio is longer than the configured limit."""


class InvalidOptionError(LiteASRError):
    """A decoding option does not fit the model (unknown language, translate on an English-only model)."""


class CompressionError(LiteASRError):
    """Compression cannot run with the given inputs (empty calibration set, bad threshold)."""


class ManifestError(LiteASRError):
    """A speech-set manifest cannot be read: missing file, bad JSON, a missing field or audio file."""


class OutOfMemoryError(LiteASRError):
    """The device ran out of memory for this pass (CUDA): retry with fewer windows or rows."""
