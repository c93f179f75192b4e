"""CTranslate2 (faster-whisper) Whisper checkpoints, read into transformers objects.

`model.bin` is parsed with numpy over a memory map: reading needs neither ctranslate2 nor a copy of the file
in memory, and only the float32 tensors handed on are materialized. The format (binary version 6, as written
by `ctranslate2.specs.model_spec.ModelSpec._serialize`) is a header, a list of named tensors, then aliases.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from liteasr.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperConfig, WhisperTokenizerFast

__all__ = [
    "BINARY_VERSION",
    "CT2Model",
    "SpecialTokens",
    "generation_config",
    "read_model_bin",
    "special_tokens",
    "to_transformers_state_dict",
    "whisper_config",
    "whisper_tokenizer",
]

BINARY_VERSION = 6
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
_TIME_PRECISION = 0.02
_NUM_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>


@dataclass(frozen=True)
class CT2Model:
    """Tensors of one model.bin, as stored (memory-mapped views, possibly quantized)."""

    path: Path
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def raw(self, name: str) -> np.ndarray:
        """The stored array, following an alias (the tied output projection is one)."""
        name = self.aliases.get(name, name)
        try:
            return self.variables[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: variable {name!r} is missing") from None

    def scalar(self, name: str) -> int | float | None:
        """A rank-0 setting such as `decoder/pre_norm`, or None where this file does not store it."""
        if name not in self.variables:
            return None
        return self.variables[name].item()

    def tensor(self, name: str) -> np.ndarray:
        """float32 weights; int8/int16 are divided by their `<name>_scale` as CTranslate2 does."""
        name = self.aliases.get(name, name)
        value = self.raw(name)
        scale = self.variables.get(f"{name}_scale")
        if scale is None:
            if value.dtype.kind != "f":
                raise CheckpointError(f"{self.path}: {name!r} is {value.dtype} but has no {name}_scale")
            return value.astype(np.float32)
        scale = scale.astype(np.float32)
        if scale.ndim == 0:  # int16: one scale per tensor
            return value.astype(np.float32) / scale
        rows = value.reshape(value.shape[0], -1)  # int8: one scale per output row (conv: per output channel)
        if scale.shape != (rows.shape[0],):
            raise CheckpointError(
                f"{self.path}: {name}_scale has shape {scale.shape}, expected ({rows.shape[0]},) for {name} "
                f"{value.shape}"
            )
        return (rows.astype(np.float32) / scale[:, None]).reshape(value.shape)


class _Cursor:
    """Reads little-endian fields from a buffer and says where a file ends too early."""

    def __init__(self, path: Path, buffer: np.ndarray):
        self.path = path
        self.buffer = buffer
        self.offset = 0

    def take(self, size: int, what: str) -> int:
        start = self.offset
        if start + size > len(self.buffer):
            raise CheckpointError(
                f"{self.path} is truncated: {what} needs {size} bytes at offset {start}, "
                f"the file has {len(self.buffer)} bytes"
            )
        self.offset += size
        return start

    def unpack(self, fmt: str, what: str) -> int:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def string(self, what: str) -> str:
        size = self.unpack("<H", what)  # length includes the trailing NUL
        start = self.take(size, what)
        return self.buffer[start : start + size - 1].tobytes().decode("utf-8")

    def array(self, dtype: str, shape: tuple[int, ...], size: int, what: str) -> np.ndarray:
        start = self.take(size, what)
        storage = "<u2" if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64))
        if count * np.dtype(storage).itemsize != size:
            raise CheckpointError(
                f"{self.path}: {what} {dtype}{list(shape)} cannot be stored in {size} bytes"
            )
        array = np.frombuffer(self.buffer, dtype=storage, count=count, offset=start).reshape(shape)
        if dtype == "bfloat16":  # numpy has no bfloat16: widen the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def read_model_bin(path: str | Path) -> CT2Model:
    """Parse model.bin without loading it: arrays are views into a read-only memory map."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    cursor = _Cursor(path, np.memmap(path, dtype=np.uint8, mode="r"))
    version = cursor.unpack("<I", "the binary version")
    if version != BINARY_VERSION:
        raise CheckpointError(
            f"{path}: unsupported CTranslate2 binary version {version}, expected {BINARY_VERSION}"
        )
    spec = cursor.string("the spec name")
    if spec != "WhisperSpec":
        raise CheckpointError(f"{path} holds a {spec}, not a Whisper model")
    revision = cursor.unpack("<I", "the spec revision")
    variables: dict[str, np.ndarray] = {}
    for _ in range(cursor.unpack("<I", "the variable count")):
        name = cursor.string("a variable name")
        rank = cursor.unpack("<B", f"the rank of {name}")
        shape = tuple(cursor.unpack("<I", f"the shape of {name}") for _ in range(rank))
        type_id = cursor.unpack("<B", f"the dtype of {name}")
        if type_id >= len(_DTYPES):
            raise CheckpointError(f"{path}: {name} has unknown dtype id {type_id}")
        size = cursor.unpack("<I", f"the byte count of {name}")
        variables[name] = cursor.array(_DTYPES[type_id], shape, size, name)
    aliases = {}
    for _ in range(cursor.unpack("<I", "the alias count")):
        alias = cursor.string("an alias")
        aliases[alias] = cursor.string(f"the target of alias {alias}")
    if cursor.offset != len(cursor.buffer):  # e.g. split parts joined twice or in the wrong order
        raise CheckpointError(f"{path} has {len(cursor.buffer) - cursor.offset} bytes after its last alias")
    return CT2Model(path, spec, revision, variables, aliases)


# --- names --------------------------------------------------------------------------------------------------

_LEAVES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}
_MODULES = {
    "encoder/conv1": "model.encoder.conv1",
    "encoder/conv2": "model.encoder.conv2",
    "encoder/position_encodings": "model.encoder.embed_positions",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "decoder/position_encodings": "model.decoder.embed_positions",
    "decoder/embeddings": "model.decoder.embed_tokens",
    "decoder/layer_norm": "model.decoder.layer_norm",
    "decoder/projection": "proj_out",
}
_LAYER_MODULES = {
    "self_attention/linear_1": "self_attn.out_proj",
    "self_attention/layer_norm": "self_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
    "ffn/layer_norm": "final_layer_norm",
}
# CTranslate2 fuses these projections; transformers keeps them apart and has no bias on k_proj.
_FUSED = {
    "self_attention/linear_0": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "attention/linear_1": ("encoder_attn", ("k_proj", "v_proj")),
}
# Rank-0 settings with the value transformers' Whisper implements; anything else cannot be converted.
_EXPECTED_SCALARS = {
    "decoder/activation": _GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/embeddings/multiply_by_sqrt_depth": 0,
}
_INFORMATIVE_SCALARS = {
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    # Newer converters write these; they only act when decoder/alibi is on, which is refused above.
    "decoder/alibi_use_positive_positions",
    "decoder/scale_alibi",
}
_LAYER = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)")


def _target(module: str) -> str | tuple[str, tuple[str, ...]]:
    match = _LAYER.fullmatch(module)
    if match is None:
        if module in _MODULES:
            return _MODULES[module]
        raise KeyError(module)
    side, index, part = match.groups()
    prefix = f"model.{side}.layers.{index}."
    if part in _FUSED:
        parent, pieces = _FUSED[part]
        return prefix + parent, pieces
    return prefix + _LAYER_MODULES[part]


def to_transformers_state_dict(model: CT2Model) -> dict[str, np.ndarray]:
    """float32 arrays under WhisperForConditionalGeneration names (proj_out.weight included, tied)."""
    state: dict[str, np.ndarray] = {}
    converted: dict[str, np.ndarray] = {}  # by stored name, so an alias shares its target's array
    names = [n for n in model.variables if not n.endswith("_scale")] + list(model.aliases)
    for name in names:
        if model.raw(name).ndim == 0:
            continue  # settings, checked by whisper_config
        module, _, leaf = name.rpartition("/")
        try:
            target, key = _target(module), _LEAVES[leaf]
        except KeyError:
            raise CheckpointError(
                f"{model.path}: no transformers counterpart for variable {name!r}"
            ) from None
        stored = model.aliases.get(name, name)
        if stored not in converted:
            converted[stored] = model.tensor(stored)
        value = converted[stored]
        if isinstance(target, str):
            state[f"{target}.{key}"] = value
            continue
        parent, pieces = target
        if value.shape[0] % len(pieces):
            raise CheckpointError(
                f"{model.path}: {name} has {value.shape[0]} rows, "
                f"not divisible into {len(pieces)} projections"
            )
        for piece, part in zip(pieces, np.split(value, len(pieces)), strict=True):
            if piece == "k_proj" and key == "bias":
                if np.any(part):
                    raise CheckpointError(
                        f"{model.path}: {name} has a non-zero key bias, which Whisper lacks"
                    )
                continue
            state[f"{parent}.{piece}.{key}"] = part
    return state


# --- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens, taken from the tokenizer since model.bin does not store them."""

    end_of_text: int
    start_of_transcript: int
    start_of_prev: int
    no_timestamps: int
    translate: int
    transcribe: int
    languages: dict[str, int]  # "<|en|>" -> id


def special_tokens(tokenizer_json: dict[str, Any]) -> SpecialTokens:
    """Find the control tokens among tokenizer.json's added tokens."""
    added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    names = {
        "end_of_text": "<|endoftext|>",
        "start_of_transcript": "<|startoftranscript|>",
        "start_of_prev": "<|startofprev|>",
        "no_timestamps": "<|notimestamps|>",
        "translate": "<|translate|>",
        "transcribe": "<|transcribe|>",
    }
    missing = [token for token in names.values() if token not in added]
    if missing:
        raise CheckpointError(f"tokenizer.json lacks the special tokens {missing}")
    languages = {token: id_ for token, id_ in added.items() if re.fullmatch(r"<\|[a-z]{2,3}\|>", token)}
    return SpecialTokens(**{field: added[token] for field, token in names.items()}, languages=languages)


def _count_layers(model: CT2Model, side: str) -> int:
    indices = {int(m.group(2)) for n in model.variables if (m := _LAYER.fullmatch(n)) and m.group(1) == side}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{model.path}: {side} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _check_shape(model: CT2Model, name: str, expected: tuple[int, ...]) -> None:
    actual = model.raw(name).shape
    if actual != expected:
        raise CheckpointError(f"{model.path}: {name} has shape {actual}, expected {expected}")


def whisper_config(model: CT2Model, ct2_config: dict[str, Any], tokens: SpecialTokens) -> WhisperConfig:
    """A WhisperConfig from tensor shapes and settings; every layer's shapes are checked against it."""
    from transformers import WhisperConfig

    for name, expected in _EXPECTED_SCALARS.items():
        actual = model.scalar(name)
        if actual is not None and actual != expected:
            raise CheckpointError(f"{model.path}: {name} is {actual}, transformers' Whisper needs {expected}")
    settings = {n for n, v in model.variables.items() if v.ndim == 0 and not n.endswith("_scale")}
    unknown = settings - set(_EXPECTED_SCALARS) - _INFORMATIVE_SCALARS
    if unknown:
        raise CheckpointError(f"{model.path}: unsupported settings {sorted(unknown)}")

    vocab_size, d_model = model.raw("decoder/embeddings/weight").shape
    conv1 = model.raw("encoder/conv1/weight").shape
    if len(conv1) != 3 or conv1[0] != d_model:
        raise CheckpointError(
            f"{model.path}: encoder/conv1/weight has shape {conv1}, expected ({d_model}, mels, 3)"
        )
    heads = {side: model.scalar(f"{side}/num_heads") for side in ("encoder", "decoder")}
    for side, count in heads.items():
        if count is None or count <= 0 or d_model % count:
            raise CheckpointError(
                f"{model.path}: {side}/num_heads is {count}, which does not divide d_model {d_model}"
            )
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(conv1[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=int(heads["encoder"]),
        decoder_attention_heads=int(heads["decoder"]),
        encoder_ffn_dim=int(model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(model.raw("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(model.raw("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.raw("decoder/position_encodings/encodings").shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=tokens.end_of_text,
        bos_token_id=tokens.end_of_text,
        eos_token_id=tokens.end_of_text,
        decoder_start_token_id=tokens.start_of_transcript,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )
    _check_shapes(model, config)
    for token in (*config.suppress_tokens, *config.begin_suppress_tokens, tokens.no_timestamps):
        if not 0 <= token < vocab_size:
            raise CheckpointError(f"token id {token} is outside the vocabulary of {vocab_size}")
    for layer, head in ct2_config.get("alignment_heads", []):
        if not (0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads):
            raise CheckpointError(f"alignment head ({layer}, {head}) does not exist in this decoder")
    return config


def _check_shapes(model: CT2Model, config: WhisperConfig) -> None:
    d, mels = config.d_model, config.num_mel_bins
    _check_shape(model, "encoder/conv1/weight", (d, mels, 3))
    _check_shape(model, "encoder/conv2/weight", (d, d, 3))
    _check_shape(model, "decoder/projection/weight", (config.vocab_size, d))
    for side, layers, ffn in (
        ("encoder", config.encoder_layers, config.encoder_ffn_dim),
        ("decoder", config.decoder_layers, config.decoder_ffn_dim),
    ):
        _check_shape(model, f"{side}/layer_norm/gamma", (d,))
        for i in range(layers):
            layer = f"{side}/layer_{i}"
            _check_shape(model, f"{layer}/self_attention/linear_0/weight", (3 * d, d))
            _check_shape(model, f"{layer}/self_attention/linear_0/bias", (3 * d,))
            _check_shape(model, f"{layer}/self_attention/linear_1/weight", (d, d))
            _check_shape(model, f"{layer}/ffn/linear_0/weight", (ffn, d))
            _check_shape(model, f"{layer}/ffn/linear_1/weight", (d, ffn))
            if side == "decoder":
                _check_shape(model, f"{layer}/attention/linear_0/weight", (d, d))
                _check_shape(model, f"{layer}/attention/linear_1/weight", (2 * d, d))
                _check_shape(model, f"{layer}/attention/linear_2/weight", (d, d))


def generation_config(
    config: WhisperConfig, ct2_config: dict[str, Any], tokens: SpecialTokens
) -> GenerationConfig:
    """Whisper's generate() settings as the openai/whisper-* checkpoints carry them, minus forced_decoder_ids.

    `forced_decoder_ids` would override `task`/`language` chosen per request; English-only models get no
    `lang_to_id`, since its presence alone makes generate() run language detection.
    """
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= 51865  # as transformers decides: English-only vocabularies have 51864
    extra: dict[str, Any] = {}
    if multilingual:
        lang_ids = set(
            ct2_config.get("lang_ids") or tokens.languages.values()
        )  # newer converters may write []
        extra = {
            "lang_to_id": {
                t: i for t, i in sorted(tokens.languages.items(), key=lambda kv: kv[1]) if i in lang_ids
            },
            "task_to_id": {"translate": tokens.translate, "transcribe": tokens.transcribe},
            "task": "transcribe",
        }
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=tokens.no_timestamps,
        prev_sot_token_id=tokens.start_of_prev,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
        **extra,
    )


def whisper_tokenizer(tokenizer_json: Path, vocab_size: int) -> WhisperTokenizerFast:
    """A WhisperTokenizerFast whose ids match the model, timestamps included.

    CTranslate2's tokenizer.json stops at <|notimestamps|>. The control tokens become extra special tokens,
    in id order, because transformers locates the first timestamp as `all_special_ids[-1] + 1`; the 1501
    timestamps are then added as ordinary added tokens (as on the Hub), since making them special too would
    move that anchor to <|30.00|> and break `output_offsets` and `_decode_with_timestamps`.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    tokens = special_tokens(data)
    control = [
        t["content"] for t in sorted(data["added_tokens"], key=lambda t: t["id"]) if t.get("special", True)
    ]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        extra_special_tokens=control,
    )
    timestamps = ["<|%.2f|>" % (i * _TIME_PRECISION) for i in range(_NUM_TIMESTAMPS)]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    first = tokenizer.convert_tokens_to_ids(timestamps[0])
    if first != tokens.no_timestamps + 1 or tokenizer.all_special_ids[-1] != tokens.no_timestamps:
        raise CheckpointError(
            f"{tokenizer_json}: <|0.00|> got id {first}, "
            f"expected {tokens.no_timestamps + 1} (<|notimestamps|> + 1)"
        )
    if len(tokenizer) != vocab_size:
        raise CheckpointError(
            f"{tokenizer_json}: tokenizer has {len(tokenizer)} tokens, the model {vocab_size}"
        )
    return tokenizer
