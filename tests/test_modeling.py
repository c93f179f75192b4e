"""The lite-whisper format: published names and shapes, save/load, Auto classes, remote code, factorization."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    GenerationConfig,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from liteasr.errors import CheckpointError
from liteasr.modeling import (
    LOW_RANK_MAPS,
    LiteWhisperConfig,
    LiteWhisperForConditionalGeneration,
    LiteWhisperModel,
    LowRankLinear,
    RowwiseInt8Linear,
    encoder_parameters,
    factorize_linear,
    fuse_linears,
    load_model,
    quantize_int8,
)

# The lite test model: every map kind is low-rank in one layer and dense in the other; k_proj gains a bias.
RANKS = {
    (0, "q_proj"): 8,
    (0, "k_proj"): 4,
    (0, "fc1"): 24,
    (1, "v_proj"): 8,
    (1, "out_proj"): 12,
    (1, "fc2"): 16,
}
DECODER_IDS = torch.tensor([[3, 5, 7, 9]])


def encoder_map(model: nn.Module, layer: int, name: str) -> nn.Module:
    owner = model.model.encoder.layers[layer]
    return getattr(owner if name.startswith("fc") else owner.self_attn, name)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=generator))
    return q[:, :cols]


def factorize(model: WhisperForConditionalGeneration, ranks: dict[tuple[int, str], int]) -> dict:
    maps = {}
    for seed, ((layer, name), rank) in enumerate(ranks.items()):
        dense = encoder_map(model, layer, name)
        mean = torch.randn(dense.out_features, generator=torch.Generator().manual_seed(seed))
        maps[layer, name] = factorize_linear(dense, orthonormal(dense.out_features, rank, seed), mean)
    return maps


def logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(features, decoder_input_ids=DECODER_IDS).logits


@pytest.fixture
def dense(tiny_whisper_config: WhisperConfig) -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config).eval()
    with torch.no_grad():  # Whisper starts biases at zero, which would hide bias handling.
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


@pytest.fixture
def lite(dense: WhisperForConditionalGeneration) -> LiteWhisperForConditionalGeneration:
    return LiteWhisperForConditionalGeneration.from_whisper(dense, factorize(dense, RANKS))


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))


def test_saved_checkpoint_uses_the_published_names_shapes_and_config(lite, tmp_path):
    lite.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    d_model, ffn = lite.config.d_model, lite.config.encoder_ffn_dim
    shapes = {"q_proj": (d_model, d_model), "k_proj": (d_model, d_model), "v_proj": (d_model, d_model)}
    shapes |= {"out_proj": (d_model, d_model), "fc1": (d_model, ffn), "fc2": (ffn, d_model)}
    for layer in range(lite.config.encoder_layers):
        for name, (n_in, n_out) in shapes.items():
            prefix = f"model.encoder.layers.{layer}.{'' if name.startswith('fc') else 'self_attn.'}{name}"
            present = {key.removeprefix(prefix + ".") for key in weights if key.startswith(prefix + ".")}
            if (rank := RANKS.get((layer, name))) is not None:
                assert present == {"weight1", "weight2", "bias"}
                assert weights[f"{prefix}.weight1"].shape == (n_in, rank)
                assert weights[f"{prefix}.weight2"].shape == (rank, n_out)
                assert weights[f"{prefix}.bias"].shape == (n_out,)
            else:
                assert present == ({"weight"} if name == "k_proj" else {"weight", "bias"})
                assert weights[f"{prefix}.weight"].shape == (n_out, n_in)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lite-whisper"
    assert config["architectures"] == ["LiteWhisperForConditionalGeneration"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
        "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
        "AutoModelForSpeechSeq2Seq": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
    }
    assert config["low_rank_config"] == [
        {"q_proj": 8, "k_proj": 4, "fc1": 24},
        {"v_proj": 8, "out_proj": 12, "fc2": 16},
    ]
    assert (tmp_path / "configuration_lite_whisper.py").is_file()
    assert (tmp_path / "modeling_lite_whisper.py").is_file()


def test_round_trip_gives_identical_outputs(lite, tmp_path, features):
    lite.save_pretrained(tmp_path)
    loaded = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "sdpa"
    for layer, name in RANKS:
        assert isinstance(encoder_map(loaded, layer, name), LowRankLinear)
    assert torch.equal(logits(loaded, features), logits(lite, features))


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForSpeechSeq2Seq])
def test_auto_classes_load_the_lite_model(auto_class, lite, tmp_path, features):
    lite.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LiteWhisperForConditionalGeneration)
    assert torch.equal(logits(loaded, features), logits(lite, features))


def test_lite_model_class_loads_the_base_model(lite, tmp_path, features):
    lite.save_pretrained(tmp_path)
    base = LiteWhisperModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = lite.model.encoder(features).last_hidden_state
        assert torch.equal(base.encoder(features).last_hidden_state, expected)


def test_checkpoint_loads_with_trust_remote_code_without_liteasr(lite, tmp_path, features):
    model_dir = tmp_path / "model"
    lite.save_pretrained(model_dir)
    torch.save({"features": features, "logits": logits(lite, features)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from transformers import AutoModel, AutoModelForSpeechSeq2Seq

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for auto_class in (AutoModel, AutoModelForSpeechSeq2Seq):
            model = auto_class.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                out = model(expected["features"], decoder_input_ids=torch.tensor({DECODER_IDS.tolist()})).logits
            assert torch.equal(out, expected["logits"]), (out - expected["logits"]).abs().max()
        assert not [name for name in sys.modules if name.split(".")[0] == "liteasr"]
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_published_checkpoint_layout_loads(lite, tmp_path, features):
    """A config.json as published: no low_rank_attention, two auto_map entries, legacy keys, no code files."""
    lite.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    del config["low_rank_attention"], config["dtype"]
    config["auto_map"] = {
        "AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
        "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
    }
    config |= {"torch_dtype": "float32", "transformers_version": "4.46.0", "max_length": 448}
    config_path.write_text(json.dumps(config))
    for path in tmp_path.glob("*.py"):
        path.unlink()

    loaded = load_model(tmp_path)
    assert isinstance(loaded, LiteWhisperForConditionalGeneration)
    assert loaded.config.low_rank_attention is False
    assert torch.equal(logits(loaded, features), logits(lite, features))


def test_generation_config_survives_from_whisper_and_save(dense, tmp_path):
    whisper_fields = {
        "max_length": 448,
        "no_timestamps_token_id": 50,
        "alignment_heads": [[1, 0], [1, 2]],
        "lang_to_id": {"<|en|>": 40},
        "task_to_id": {"transcribe": 41},
        "is_multilingual": True,
    }
    for name, value in whisper_fields.items():
        setattr(dense.generation_config, name, value)
    lite = LiteWhisperForConditionalGeneration.from_whisper(dense, factorize(dense, {(0, "fc1"): 16}))
    lite.save_pretrained(tmp_path)
    loaded = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path)

    def fields(config: GenerationConfig) -> dict:
        metadata = ("_from_model_config", "transformers_version")
        return {k: v for k, v in config.to_dict().items() if k not in metadata}

    assert whisper_fields.items() <= fields(dense.generation_config).items()
    assert fields(lite.generation_config) == fields(dense.generation_config)
    assert fields(loaded.generation_config) == fields(dense.generation_config)


def test_full_rank_factorization_reproduces_the_encoder_and_generation(dense, features):
    every_map = {(layer, name): dense.config.d_model for layer in range(2) for name in LOW_RANK_MAPS}
    every_map |= {(layer, "fc1"): dense.config.encoder_ffn_dim for layer in range(2)}
    lite = LiteWhisperForConditionalGeneration.from_whisper(dense, factorize(dense, every_map))
    assert all(isinstance(encoder_map(lite, *key), LowRankLinear) for key in every_map)
    with torch.no_grad():
        expected = dense.model.encoder(features).last_hidden_state
        torch.testing.assert_close(
            lite.model.encoder(features).last_hidden_state, expected, atol=1e-4, rtol=1e-4
        )
    generated = lite.generate(features, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, dense.generate(features, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("bias", [True, False])
def test_factorize_linear_at_full_rank_reproduces_the_map(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 32, bias=bias)
    x = torch.randn(5, 48)
    for basis, mean in [(orthonormal(32, 32, 0), torch.randn(32)), (torch.eye(32), None)]:
        low = factorize_linear(linear, basis, mean)
        assert (low.in_features, low.out_features, low.rank) == (48, 32, 32)
        torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_factorize_linear_projects_outputs_around_the_mean(bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 32, bias=bias).double()
    x, mean = torch.randn(5, 48, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    basis = orthonormal(32, 8, 0)
    low = factorize_linear(linear, basis, mean)
    y = linear(x)
    expected = mean + (y - mean) @ basis @ basis.T
    torch.testing.assert_close(low(x), expected)
    # Rank 8 of 32 must lose something, or the check above proves nothing.
    assert (low(x) - y).abs().max() > 0.1


def test_shape_errors_say_expected_and_actual(dense):
    with pytest.raises(ValueError, match=r"expects 16 input features, got input of shape \(2, 15\)"):
        LowRankLinear(16, 8, 4)(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"must be \[rank, out\] = \[4, 8\].*got \[5, 8\]"):
        LowRankLinear.from_factors(torch.randn(16, 4), torch.randn(5, 8), torch.randn(8))
    with pytest.raises(ValueError, match=r"basis must be \[out_features, k\] = \[8, k\].*got \[7, 4\]"):
        factorize_linear(nn.Linear(16, 8), torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"mean must have shape \[8\], got \[7\]"):
        factorize_linear(nn.Linear(16, 8), orthonormal(8, 4, 0), torch.randn(7))
    with pytest.raises(ValueError, match=r"\(in, out\) features \(64, 64\), got \(64, 32\)"):
        LiteWhisperForConditionalGeneration.from_whisper(dense, {(0, "q_proj"): LowRankLinear(64, 32, 4)})
    with pytest.raises(ValueError, match=r"expected a layer in \[0, 2\)"):
        LiteWhisperForConditionalGeneration.from_whisper(dense, {(2, "q_proj"): LowRankLinear(64, 64, 4)})
    with pytest.raises(ValueError, match=r"expected 2, got 1"):
        LiteWhisperConfig(encoder_layers=2, low_rank_config=[{}])
    with pytest.raises(ValueError, match=r"names \['gate'\]"):
        LiteWhisperConfig(encoder_layers=1, low_rank_config=[{"gate": 4}])
    with pytest.raises(ValueError, match=r"positive integer ranks, got \{'fc1': 0\}"):
        LiteWhisperConfig(encoder_layers=1, low_rank_config=[{"fc1": 0}])


def test_from_whisper_keeps_existing_low_rank_maps(lite, features):
    more = LiteWhisperForConditionalGeneration.from_whisper(lite, factorize(lite, {(1, "k_proj"): 8}))
    assert more.config.low_rank_config == [
        {"q_proj": 8, "k_proj": 4, "fc1": 24},
        {**lite.config.low_rank_config[1], "k_proj": 8},
    ]
    assert torch.equal(encoder_map(more, 0, "q_proj").weight1, encoder_map(lite, 0, "q_proj").weight1)
    assert not torch.equal(logits(more, features), logits(lite, features))


def test_load_model_reads_whisper_and_lite_checkpoints(dense, lite, tmp_path):
    dense.save_pretrained(tmp_path / "dense")
    lite.save_pretrained(tmp_path / "lite")
    for name, kind in [
        ("dense", WhisperForConditionalGeneration),
        ("lite", LiteWhisperForConditionalGeneration),
    ]:
        model = load_model(tmp_path / name, dtype=torch.bfloat16)
        assert type(model) is kind
        assert model.dtype == torch.bfloat16 and not model.training
        assert model.config._attn_implementation == "sdpa"


def test_load_model_errors_are_checkpoint_errors(dense, tmp_path):
    with pytest.raises(CheckpointError, match="cannot load a model from"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="cannot load a model from"):
        load_model(tmp_path)
    dense.save_pretrained(tmp_path / "mislabeled")
    config_path = tmp_path / "mislabeled" / "config.json"
    config = json.loads(config_path.read_text())
    config |= {"model_type": "lite-whisper", "low_rank_config": [{"q_proj": 8}, {}]}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"2 missing keys .*q_proj.weight1.*1 unexpected keys"):
        load_model(tmp_path / "mislabeled")


def test_encoder_parameters_count_like_the_paper(dense, lite):
    d, ffn = 64, 128
    layer = 4 * d * d + 3 * d + 2 * d * ffn + ffn + d + 4 * d
    assert encoder_parameters(dense) == (80 * d * 3 + d) + (d * d * 3 + d) + 2 * layer + 2 * d
    saved = 0
    for (_, name), rank in RANKS.items():
        n_in, n_out = {"fc1": (d, ffn), "fc2": (ffn, d)}.get(name, (d, d))
        saved += n_in * n_out - rank * (n_in + n_out) - (n_out if name == "k_proj" else 0)
    assert encoder_parameters(lite) == encoder_parameters(dense) - saved

    # The published encoder sizes: tiny 7.63M, base 19.82M.
    for d_model, layers, heads, expected in [(384, 4, 6, 7_632_384), (512, 6, 8, 19_822_592)]:
        config = WhisperConfig(
            d_model=d_model,
            encoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=4 * d_model,
            decoder_layers=1,
        )
        with torch.device("meta"):
            assert encoder_parameters(WhisperForConditionalGeneration(config)) == expected


def test_int8_quantization_covers_low_rank_factors_and_keeps_the_outputs(lite, features):
    reference = logits(lite, features)
    quantized = quantize_int8(copy.deepcopy(lite), "all")
    layer = quantized.model.encoder.layers[0]
    assert not any(isinstance(m, LowRankLinear) for m in quantized.modules())
    assert not any(type(m) is nn.Linear for m in quantized.modules())  # every linear map is int8 now
    assert isinstance(layer.self_attn.q_proj, nn.Sequential)  # a factorized map: two int8 maps in a row
    assert isinstance(layer.self_attn.q_proj[0], torch.ao.nn.quantized.dynamic.Linear)
    similarity = F.cosine_similarity(logits(quantized, features).flatten(), reference.flatten(), dim=0)
    assert similarity > 0.99, similarity


def test_int8_leaves_the_named_maps_in_float_and_refuses_unknown_ones(lite):
    def int8_maps(module: nn.Module) -> int:
        return sum(type(m) is torch.ao.nn.quantized.dynamic.Linear for m in module.modules())

    kept = ["layers.0.self_attn.q_proj", "layers.1.fc1"]  # one factorized, one dense
    encoder = quantize_int8(copy.deepcopy(lite), "all", keep_float=kept).model.encoder
    assert [int8_maps(encoder.get_submodule(name)) for name in kept] == [0, 0]
    assert int8_maps(encoder.layers[1].fc2) == 2 and int8_maps(encoder.layers[0].fc2) == 1
    with pytest.raises(CheckpointError, match="layers.9.fc2"):
        quantize_int8(copy.deepcopy(lite), "all", keep_float=["layers.9.fc2"])


def test_int8_keeps_the_small_principal_coordinates_of_a_factorized_map(lite):
    """A factorized map's intermediate holds principal coordinates whose scales fall by 10^4 here; with one int8
    scale for all of them the weak half is lost (error 1.04 of its size, measured), rebalanced it is not."""
    torch.manual_seed(0)
    layer = lite.model.encoder.layers[0]
    d_in, d_out, rank = layer.fc2.in_features, layer.fc2.out_features, 32
    basis = torch.linalg.qr(torch.randn(d_out, d_out))[0][:, :rank]
    factors = LowRankLinear.from_factors(
        torch.randn(d_in, rank) * torch.logspace(2, -2, rank), basis.T.contiguous(), torch.zeros(d_out)
    )
    layer.fc2 = factors
    x = torch.randn(200, d_in)
    with torch.no_grad():
        reference = factors(x)
        quantized = quantize_int8(lite, "all").model.encoder.layers[0].fc2(x)
    weak = basis[:, rank // 2 :]
    error = float(((quantized - reference) @ weak).norm() / (reference @ weak).norm())
    assert error < 0.5, error


def test_int8_quantization_of_the_decoder_leaves_the_encoder_in_float(lite, features):
    reference = logits(lite, features)
    quantized = quantize_int8(copy.deepcopy(lite))
    assert any(isinstance(m, LowRankLinear) for m in quantized.model.encoder.modules())
    assert not any(type(m) is nn.Linear for m in quantized.model.decoder.modules())
    assert isinstance(quantized.proj_out, RowwiseInt8Linear)
    similarity = F.cosine_similarity(logits(quantized, features).flatten(), reference.flatten(), dim=0)
    assert similarity > 0.99, similarity


def test_an_int8_decoder_row_is_rounded_as_it_would_be_alone(lite):
    """A decode step's rows share each int8 call; a step-mate 100x larger must not coarsen another row's rounding
    (it does with torch's one scale per call, checked here too, so the test can tell)."""
    decoder = quantize_int8(copy.deepcopy(lite)).model.decoder
    rowwise = decoder.layers[0].fc1
    assert isinstance(rowwise, RowwiseInt8Linear)
    linear = nn.Linear(rowwise.in_features, rowwise.out_features)
    with torch.no_grad():
        linear.weight.copy_(rowwise.weight().dequantize())
        linear.bias.copy_(rowwise.bias)
    per_call = torch.ao.quantization.quantize_dynamic(
        nn.Sequential(linear),
        {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
        dtype=torch.qint8,
    )[0]
    torch.manual_seed(0)
    row = torch.randn(1, 1, rowwise.in_features)
    step = torch.cat(
        [row, 100 * torch.randn(2, 1, rowwise.in_features), torch.zeros(1, 1, rowwise.in_features)]
    )
    with torch.no_grad():
        assert torch.equal(rowwise(step)[:1], rowwise(row))
        assert not torch.equal(per_call(step)[:1], per_call(row))
        assert torch.equal(rowwise(step)[3, 0], rowwise.bias)  # a row of zeros gives the bias
        error = (rowwise(row) - linear(row)).norm() / linear(row).norm()
    assert error < 0.02, error


@pytest.mark.parametrize("int8", [False, True])
def test_fused_linears_give_each_map_s_output_exactly(lite, int8):
    """The decode step's fused q/k/v (k has no bias): the same numbers as the three maps, float or int8."""
    model = quantize_int8(copy.deepcopy(lite)) if int8 else copy.deepcopy(lite)
    attention = model.model.decoder.layers[0].self_attn
    maps = [attention.q_proj, attention.k_proj, attention.v_proj]
    x = torch.randn(3, 5, maps[0].in_features)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        separate = torch.cat([m(x) for m in maps], dim=-1)
        fused = fuse_linears(maps)
        assert torch.equal(fused(x), separate)
    after = model.state_dict()  # the maps are left as they were
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_fusing_float_and_int8_maps_is_refused(lite):
    decoder = quantize_int8(copy.deepcopy(lite)).model.decoder
    with pytest.raises(TypeError, match="cannot fuse"):
        fuse_linears([lite.model.decoder.layers[0].self_attn.q_proj, decoder.layers[0].self_attn.k_proj])


def test_int8_quantization_is_for_the_cpu(lite):
    lite.to("meta")
    with pytest.raises(CheckpointError, match="CPU only"):
        quantize_int8(lite)
