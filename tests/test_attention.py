"""Reduced-dimension self-attention equals Whisper's dense attention over the same low-rank maps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperAttention

from liteasr.attention import LowRankSelfAttention, supports_low_rank_attention, use_low_rank_attention
from liteasr.modeling import LiteWhisperConfig, LiteWhisperForConditionalGeneration, LowRankLinear

# tiny_whisper_config: d_model 64, 4 heads, so head_dim 16.
LENGTH = 37


def low_rank(n_in: int, n_out: int, rank: int, bias: bool) -> LowRankLinear:
    module = LowRankLinear(n_in, n_out, rank)
    with torch.no_grad():
        module.bias.copy_(torch.randn(n_out) if bias else torch.zeros(n_out))
    return module


def attention(
    config: WhisperConfig, kq: int, kk: int, kv: int | None, bias: bool, implementation: str = "sdpa"
) -> WhisperAttention:
    """Encoder self-attention with low-rank q and k (and v unless `kv` is None), biases random or zero."""
    config = copy.deepcopy(config)
    config._attn_implementation = implementation
    d = config.d_model
    module = WhisperAttention(d, config.encoder_attention_heads, config=config).eval()
    module.q_proj, module.k_proj = low_rank(d, d, kq, bias), low_rank(d, d, kk, bias)
    if kv is not None:
        module.v_proj = low_rank(d, d, kv, bias)
    if not bias:
        for linear in (module.v_proj, module.out_proj):
            if isinstance(linear, nn.Linear):
                nn.init.zeros_(linear.bias)
    return module


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, LENGTH, 64, generator=torch.Generator().manual_seed(0))


# (kq, kk, kv) below the head dim; kk != kv pads keys or values to a common width.
RANKS = [(4, 4, 4), (8, 12, 6), (15, 8, 12), (12, 6, 15), (1, 15, 8)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("kq", "kk", "kv"), RANKS)
def test_low_rank_attention_matches_dense(tiny_whisper_config, x, kq, kk, kv, bias):
    torch.manual_seed(kq * 100 + kk)
    dense = attention(tiny_whisper_config, kq, kk, kv, bias)
    reduced = LowRankSelfAttention(dense)
    with torch.no_grad():
        expected, _ = dense(hidden_states=x)
        actual, weights = reduced(hidden_states=x)
    assert weights is None
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kq", "kk", "kv"), RANKS[:3])
def test_mask_and_attention_weights_match_eager(tiny_whisper_config, x, kq, kk, kv):
    torch.manual_seed(1)
    dense = attention(tiny_whisper_config, kq, kk, kv, bias=True, implementation="eager")
    reduced = LowRankSelfAttention(dense)
    mask = torch.zeros(2, 1, LENGTH, LENGTH)
    mask[0, ..., 30:] = torch.finfo(torch.float32).min  # first item: the last keys are padding
    with torch.no_grad():
        expected, expected_weights = dense(hidden_states=x, attention_mask=mask, output_attentions=True)
        actual, weights = reduced(hidden_states=x, attention_mask=mask, output_attentions=True)
        masked, _ = reduced(hidden_states=x, attention_mask=mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-4)
    assert weights[0, :, :, 30:].max() == 0


def test_cached_factors_follow_weight_changes(tiny_whisper_config, x):
    torch.manual_seed(2)
    dense = attention(tiny_whisper_config, 8, 8, 8, bias=True)
    reduced = LowRankSelfAttention(dense)
    with torch.no_grad():
        before, _ = reduced(hidden_states=x)
        for parameter in (dense.q_proj.weight2, dense.q_proj.bias, dense.k_proj.weight2):
            parameter.mul_(1.5)
            changed, _ = reduced(hidden_states=x)
            torch.testing.assert_close(changed, dense(hidden_states=x)[0], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(changed, before, atol=1e-3)
        dense.double()
        doubled, _ = reduced(hidden_states=x.double())
        torch.testing.assert_close(doubled, dense(hidden_states=x.double())[0])


def test_bfloat16_stays_close_to_float32(tiny_whisper_config, x):
    torch.manual_seed(6)
    dense = attention(tiny_whisper_config, 8, 12, 6, bias=True)
    with torch.no_grad():
        expected, _ = dense(hidden_states=x)
        actual, _ = LowRankSelfAttention(copy.deepcopy(dense).bfloat16())(hidden_states=x.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_gradients_match_dense(tiny_whisper_config, x):
    torch.manual_seed(3)
    dense = attention(tiny_whisper_config, 8, 4, 8, bias=True).train()
    reduced = LowRankSelfAttention(copy.deepcopy(dense))
    for module in (dense, reduced):
        module(hidden_states=x)[0].square().sum().backward()
    for (name, expected), actual in zip(dense.named_parameters(), reduced.parameters(), strict=True):
        if name == "k_proj.bias":  # shifts all scores of a query row alike: no effect on the output
            assert actual.grad is None
            torch.testing.assert_close(expected.grad, torch.zeros_like(expected.grad), atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(actual.grad, expected.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_only_ranks_below_the_head_dim_qualify(tiny_whisper_config, x):
    assert supports_low_rank_attention(attention(tiny_whisper_config, 15, 15, 15, bias=True))
    for kq, kk, kv in [(16, 8, 8), (8, 16, 8), (8, 8, 16), (8, 8, None)]:
        dense = attention(tiny_whisper_config, kq, kk, kv, bias=True)
        assert not supports_low_rank_attention(dense)
        with pytest.raises(ValueError, match="rank below the head dim 16"):
            LowRankSelfAttention(dense)
    reduced = LowRankSelfAttention(attention(tiny_whisper_config, 8, 8, 8, bias=True))
    with pytest.raises(ValueError, match="no key_value_states"):
        reduced(hidden_states=x, key_value_states=x)


def test_config_flag_swaps_qualifying_encoder_layers(tiny_whisper_config, tmp_path):
    torch.manual_seed(4)
    ranks = [{"q_proj": 8, "k_proj": 4, "v_proj": 8, "fc1": 16}, {"q_proj": 8, "k_proj": 8}]
    fields = {k: v for k, v in tiny_whisper_config.to_dict().items() if k != "model_type"}
    model = LiteWhisperForConditionalGeneration(LiteWhisperConfig(**fields, low_rank_config=ranks)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path)

    fast = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path, low_rank_attention=True).eval()
    layers = fast.model.encoder.layers
    assert isinstance(layers[0].self_attn, LowRankSelfAttention)
    assert type(layers[1].self_attn) is WhisperAttention  # v is dense
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert use_low_rank_attention(fast) == 0  # already swapped

    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.model.encoder(features).last_hidden_state
        torch.testing.assert_close(
            fast.model.encoder(features).last_hidden_state, expected, atol=1e-5, rtol=1e-4
        )

    eager = {"attn_implementation": "eager"}
    slow = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path, **eager).eval()
    fast = LiteWhisperForConditionalGeneration.from_pretrained(
        tmp_path, low_rank_attention=True, **eager
    ).eval()
    with torch.no_grad():
        expected = slow.model.encoder(features, output_attentions=True).attentions
        actual = fast.model.encoder(features, output_attentions=True).attentions
    assert len(actual) == len(expected) == 2
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4)
