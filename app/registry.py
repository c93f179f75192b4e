"""The models the service can serve (folders under `LITEASR_MODELS_DIR`) and the paths the admin API may touch.

Every path a client names is resolved inside its root folder: absolute paths, `..` and symbolic links that lead
outside are refused, so the admin API reads nothing but `MODELS_DIR` and `DATA_DIR` and writes only to
`MODELS_DIR`. Messages name paths relative to their root, never the server's own layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.errors import InvalidPath, NotFound
from liteasr.checkpoints import HUB_ID

__all__ = ["ModelEntry", "ModelRegistry", "check_name", "inside", "redact"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str:
    """A model name: one folder level, letters, digits, `.`, `_`, `-`; not hidden, no `..`."""
    if not NAME.fullmatch(name) or ".." in name:
        raise InvalidPath(
            f"invalid model name {name[:100]!r}: use 1 to 100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, without '..'"
        )
    return name


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, resolved, refused unless it stays inside `root` (links followed)."""
    parts = PurePosixPath(relative).parts
    if not relative or "\x00" in relative or "\\" in relative:
        raise InvalidPath(f"{what} must be a non-empty relative path")
    if PurePosixPath(relative).is_absolute() or ".." in parts:
        raise InvalidPath(f"{what} must be a path relative to its folder, without '..'")
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise InvalidPath(f"{what} leads outside its folder (through a symbolic link)")
    return path


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path  # resolved
    created: int  # Unix time the folder was last modified
    lite: bool  # a LiteASR (lite-whisper) checkpoint, else a plain Whisper one


class ModelRegistry:
    """The model folders under one root: what `GET /v1/models` lists and the admin API activates."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self) -> list[ModelEntry]:
        """Every non-hidden folder with a `config.json` that stays inside the root, by name."""
        if not self.root.is_dir():
            return []
        entries = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not NAME.fullmatch(folder.name):
                continue
            try:
                entries.append(self._entry(folder.name))
            except (InvalidPath, NotFound):
                continue
        return entries

    def get(self, name: str) -> ModelEntry:
        check_name(name)
        return self._entry(name)

    def _entry(self, name: str) -> ModelEntry:
        path = inside(self.root, name, "the model folder")
        config = path / "config.json"
        if not config.is_file():
            raise NotFound(f"no model {name!r} in the models folder", code="model_not_found")
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        return ModelEntry(name, path, int(path.stat().st_mtime), model_type == "lite-whisper")

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name)).exists()

    def source(self, source: str) -> str:
        """What a compression job may start from: `pypi:NAME`, a Hub id, or a folder under the root (its path)."""
        if source.startswith("pypi:"):
            return source
        if not PurePosixPath(source).is_absolute() and ".." not in PurePosixPath(source).parts:
            local = self.root / source
            if local.exists():
                return str(inside(self.root, source, "source"))
        if HUB_ID.fullmatch(source):
            return source
        raise InvalidPath(
            f"source {source[:200]!r} is neither a folder in the models folder, a Hub id (owner/name) nor "
            "pypi:NAME; paths must be relative to the models folder, without '..'"
        )

    def redact(self, message: str, *roots: Path) -> str:
        """`message` with the paths of the models folder (and `roots`) made relative to them."""
        return redact(message, (self.root, *roots))


def redact(message: str, roots) -> str:
    """`message` with every absolute path under one of `roots` cut to a path relative to it."""
    for root in roots:
        for form in {str(Path(root).resolve()), str(Path(root).absolute())}:
            message = message.replace(form + "/", "").replace(form, ".")
    return message
