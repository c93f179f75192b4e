"""The speech-set manifest (JSONL, one clip a line; format in data/speech/README.md) as a list of `Clip`.

Every row is checked when read, audio files included, so a bad manifest fails before a long evaluation starts rather
than in the middle of it. Order is file order, so subsets and reports are reproducible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from liteasr.errors import ManifestError

__all__ = ["Clip", "read_manifest"]

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "audio": str,
    "text": str,
    "duration": (int, float),
    "speaker": str,
    "split": str,
    "kind": str,
}


@dataclass(frozen=True)
class Clip:
    id: str
    audio: Path  # absolute, resolved against the manifest's folder
    text: str  # reference transcript, not normalized
    duration: float  # seconds
    speaker: str  # speaker or TTS voice id
    split: str  # calib, dev, long (data/speech) or voices (data/voices)
    kind: str  # real or synthetic


def read_manifest(
    path: str | os.PathLike[str],
    *,
    split: str | Collection[str] | None = None,
    speakers: Collection[str] | None = None,
    exclude_speakers: Collection[str] | None = None,
    max_clips: int | None = None,
) -> list[Clip]:
    """Clips that pass every given filter, in file order; `max_clips` keeps the first ones after filtering."""
    manifest = Path(path)
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {manifest} is not UTF-8 text (one JSON object per line)") from None
    except OSError as e:
        raise ManifestError(f"cannot read manifest {manifest}: {e.strerror or e}") from None
    splits = {split} if isinstance(split, str) else split
    clips: list[Clip] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        clip = _parse_row(line, manifest, number)
        if clip.id in seen:
            raise ManifestError(f"{manifest}:{number}: duplicate clip id {clip.id!r}")
        seen.add(clip.id)
        if (
            (splits is None or clip.split in splits)
            and (speakers is None or clip.speaker in speakers)
            and (exclude_speakers is None or clip.speaker not in exclude_speakers)
        ):
            clips.append(clip)
    return clips if max_clips is None else clips[:max_clips]


def _parse_row(line: str, manifest: Path, number: int) -> Clip:
    where = f"{manifest}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field, kind in _FIELDS.items():
        if field not in row:
            raise ManifestError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], kind) or isinstance(row[field], bool):
            raise ManifestError(f"{where}: field {field!r} has the wrong type ({type(row[field]).__name__})")
    audio = (manifest.parent / row["audio"]).resolve()
    if not audio.is_file():
        raise ManifestError(f"{where}: audio file not found: {audio}")
    return Clip(
        id=row["id"],
        audio=audio,
        text=row["text"],
        duration=float(row["duration"]),
        speaker=row["speaker"],
        split=row["split"],
        kind=row["kind"],
    )
