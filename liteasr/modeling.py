"""Lite-whisper models: the published LiteASR checkpoint format, registered with the transformers Auto classes.

The format itself (config, `LowRankLinear`, the model classes) lives in `liteasr/remote_code/`, because the same
files are written beside every checkpoint we save so that the published loader,
`AutoModel.from_pretrained(dir, trust_remote_code=True)`, works without liteasr. This module re-exports those
classes and adds what only this library does: reduced-dimension attention (`config.low_rank_attention`), building a
lite model from a dense Whisper, and loading either kind for inference. Importing it registers "lite-whisper" with
`AutoConfig`, `AutoModel` and `AutoModelForSpeechSeq2Seq`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    GenerationConfig,
    WhisperForConditionalGeneration,
)

from liteasr.attention import use_low_rank_attention
from liteasr.errors import CheckpointError
from liteasr.remote_code import modeling_lite_whisper as _format
from liteasr.remote_code.configuration_lite_whisper import LOW_RANK_MAPS, LiteWhisperConfig
from liteasr.remote_code.modeling_lite_whisper import LiteWhisperEncoder, LiteWhisperModel, LowRankLinear

__all__ = [
    "LOW_RANK_MAPS",
    "LiteWhisperConfig",
    "LiteWhisperEncoder",
    "LiteWhisperForConditionalGeneration",
    "LiteWhisperModel",
    "LowRankLinear",
    "encoder_parameters",
    "factorize_linear",
    "fuse_linears",
    "load_model",
    "INT8_PARTS",
    "RowwiseInt8Linear",
    "quantize_encoder_int8",
    "quantize_int8",
]

REMOTE_CODE_DIR = Path(__file__).with_name("remote_code")
REMOTE_CODE_FILES = ("configuration_lite_whisper.py", "modeling_lite_whisper.py")

# Config entries that describe the dense source, not the lite model built from it.
_NOT_INHERITED = (
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "low_rank_config",
    "low_rank_attention",
)


class LiteWhisperForConditionalGeneration(_format.LiteWhisperForConditionalGeneration):
    """The published model class, plus reduced-dimension encoder attention when `config.low_rank_attention` is set.

    This is the class the Auto classes and `load_model` return. The re-exported `LiteWhisperModel` and
    `LiteWhisperEncoder` are the format alone; `liteasr.attention.use_low_rank_attention` applies to them too.
    `save_pretrained` also writes the remote-code files, so the directory loads without liteasr.
    """

    def __init__(self, config: LiteWhisperConfig) -> None:
        super().__init__(config)
        if config.low_rank_attention:
            use_low_rank_attention(self.model.encoder)

    @classmethod
    def from_whisper(
        cls,
        model: WhisperForConditionalGeneration,
        low_rank: Mapping[tuple[int, str], LowRankLinear],
        *,
        low_rank_attention: bool = False,
    ) -> LiteWhisperForConditionalGeneration:
        """A lite model: `model` with the encoder maps keyed (layer index, map name) in `low_rank` replaced.

        `model` may already be lite; its low-rank maps stay unless replaced. Each factorized map must have the
        shape of the map it replaces and is cast to that map's dtype and device. Every other tensor, and the
        generation config, is taken from `model`: tensors share storage with it (no copy, which matters for
        large-v3), so clone `model` first if you go on modifying either in place.
        """
        layers = model.model.encoder.layers
        previous = getattr(model.config, "low_rank_config", None) or [{} for _ in layers]
        low_rank_config = [dict(ranks) for ranks in previous]
        state = model.state_dict()
        for (index, name), module in low_rank.items():
            if name not in LOW_RANK_MAPS or not 0 <= index < len(layers):
                raise ValueError(
                    f"cannot factorize ({index}, {name!r}): expected a layer in [0, {len(layers)}) and a map "
                    f"among {LOW_RANK_MAPS}"
                )
            prefix = f"model.encoder.layers.{index}.{'' if name.startswith('fc') else 'self_attn.'}{name}"
            dense = model.get_submodule(prefix)
            expected = (dense.in_features, dense.out_features)
            if (module.in_features, module.out_features) != expected:
                raise ValueError(
                    f"{prefix}: the factorized map must have (in, out) features {expected}, "
                    f"got {(module.in_features, module.out_features)}"
                )
            weight = next(dense.parameters())
            for key in [key for key in state if key.startswith(f"{prefix}.")]:
                del state[key]
            for key, tensor in module.state_dict().items():
                state[f"{prefix}.{key}"] = tensor.to(device=weight.device, dtype=weight.dtype)
            low_rank_config[index][name] = module.rank

        inherited = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_INHERITED}
        config = LiteWhisperConfig(
            **inherited,
            low_rank_config=low_rank_config,
            low_rank_attention=low_rank_attention,
            attn_implementation=model.config._attn_implementation,
        )
        with torch.device("meta"):
            lite = cls(config)
        lite.load_state_dict(state, strict=True, assign=True)
        lite.tie_weights()
        # Marked as derived from the model config, a generation config drops its extra (Whisper) fields on reload.
        generation = model.generation_config.to_dict()
        generation.pop("_from_model_config", None)
        lite.generation_config = GenerationConfig.from_dict(generation)
        return lite.train(model.training)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, Path(save_directory) / name)


def factorize_linear(
    linear: nn.Linear, basis: torch.Tensor, mean: torch.Tensor | None = None
) -> LowRankLinear:
    """Project `linear`'s outputs onto the span of `basis` around `mean` (LiteASR's factorization).

    With V the orthonormal columns of `basis` (d_out x k) and mu the output mean, y = x W^T + b becomes
    (x W1) W2 + b' with W1 = W^T V, W2 = V^T, b' = mu + (b - mu) V V^T, i.e. mu + (y - mu) V V^T. Computed in
    float64, returned in `linear`'s dtype and device. `mean=None` projects around zero.
    """
    out_features = linear.out_features
    if basis.dim() != 2 or basis.shape[0] != out_features or not 1 <= basis.shape[1] <= out_features:
        raise ValueError(
            f"basis must be [out_features, k] = [{out_features}, k] with 1 <= k <= {out_features}, "
            f"got {list(basis.shape)}"
        )
    if mean is not None and mean.shape != (out_features,):
        raise ValueError(f"mean must have shape [{out_features}], got {list(mean.shape)}")
    weight = linear.weight.detach()
    v = basis.detach().to(device=weight.device, dtype=torch.float64)
    mu = torch.zeros(out_features, dtype=torch.float64, device=weight.device)
    if mean is not None:
        mu = mean.detach().to(mu)
    b = mu.new_zeros(out_features) if linear.bias is None else linear.bias.detach().to(mu)
    bias = mu + ((b - mu) @ v) @ v.T
    return LowRankLinear.from_factors(weight.to(mu).T @ v, v.T, bias).to(weight)


def encoder_parameters(model: WhisperForConditionalGeneration) -> int:
    """Encoder parameters as the LiteASR paper counts them: without the fixed positional embedding.

    openai/whisper keeps the sinusoids in a buffer, so the published sizes (7.63M for tiny) leave them out.
    """
    encoder = model.model.encoder
    return sum(p.numel() for p in encoder.parameters()) - encoder.embed_positions.weight.numel()


def load_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WhisperForConditionalGeneration:
    """Whisper or lite-whisper from a directory or Hub id, with SDPA attention, on `device` in eval mode.

    Raises `CheckpointError` when the source cannot be read, is not a Whisper model, or its weights do not fill the
    model exactly (transformers would only warn and leave the missing weights at random).
    """
    try:
        model, info = AutoModelForSpeechSeq2Seq.from_pretrained(
            os.fspath(source), dtype=dtype, attn_implementation="sdpa", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot load a model from {source}: {err}") from err
    if not isinstance(model, WhisperForConditionalGeneration):
        raise CheckpointError(f"{source} holds a {type(model).__name__}, not Whisper or lite-whisper")
    if problems := [_describe(kind, keys) for kind, keys in info.items() if kind != "error_msgs" and keys]:
        raise CheckpointError(f"the weights in {source} do not match its config: {'; '.join(problems)}")
    return model.to(device).eval()


INT8_PARTS = ("decoder", "all")
_DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


def quantize_int8(
    model: WhisperForConditionalGeneration, part: str = "decoder", *, keep_float: Sequence[str] | None = None
) -> WhisperForConditionalGeneration:
    """Dynamic int8 quantization of linear maps for inference on the CPU: the decoder's, or (`part="all"`) every
    one, low-rank factors included, except the encoder maps in `keep_float` (`quantize_encoder_int8`).

    Weights are stored in int8 with one scale per output channel and activations quantized per call (torch's
    dynamic quantization), in the decoder per row (`RowwiseInt8Linear`). On the 116 dev clips with 8 decoder rows
    (docs/benchmarks.md) the int8 decoder scores 3.81% WER on tiny.en against 4.27% in float32, 3.58% on base as
    in float32. The encoder is left in float by default: its activations carry outliers. `keep_float=None` takes
    the maps compression measured and listed in the config (`int8_float_maps`; none in a plain Whisper). Changes
    `model` in place; the result serves, it cannot be saved as a checkpoint.
    """
    if part not in INT8_PARTS:
        raise CheckpointError(f"int8 quantization of {part!r}: expected one of {', '.join(INT8_PARTS)}")
    if next(model.parameters()).device.type != "cpu":
        raise CheckpointError("int8 quantization runs on the CPU only")
    if part == "all":
        if keep_float is None:
            keep_float = getattr(model.config, "int8_float_maps", None) or ()
        quantize_encoder_int8(
            model.model.encoder,
            keep_float,
            keep_factors=bool(getattr(model.config, "low_rank_attention", False)),
        )
    with _quiet_quantization():
        torch.ao.quantization.quantize_dynamic(
            model.model.decoder, {nn.Linear: _INT8_QCONFIG}, dtype=torch.qint8, inplace=True
        )
        # The output projection (tied to the token embeddings) is the largest decoder map.
        model.proj_out = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(model.proj_out), {nn.Linear: _INT8_QCONFIG}, dtype=torch.qint8
        )[0]
    # Decoder rows share their steps with other windows: each must be rounded as it would be alone.
    for module in list(model.model.decoder.modules()):
        for name, child in list(module.named_children()):
            if type(child) is _DynamicLinear:
                setattr(module, name, RowwiseInt8Linear(child))
    model.proj_out = RowwiseInt8Linear(model.proj_out)
    return model


_TINY = torch.finfo(torch.float32).tiny


class RowwiseInt8Linear(nn.Module):
    """A dynamic int8 linear map that quantizes each row of its input on its own.

    torch's dynamic quantization takes one activation range per call from the whole input, so in a decode step a
    row's rounding depends on its step-mates: with the decoder in int8, 12 of tiny.en's 116 dev windows changed
    tokens between being decoded alone and among 8 rows (`bench/batch_invariance.py`). Here each row is divided by
    its largest magnitude before the call and multiplied by it after (the map is linear), and a constant row
    (1, -1, 0, ...) appended to every call pins the call's range to [-1, 1]: every row is rounded as it would be
    alone, whatever shares its step, and int8 products are exact. Mapping each row's [min, max] instead (finer for
    the one-sided inputs after the GELU) was tried: more windows changed tokens with their step-mates and base's
    dev WER rose 0.3 points (docs/benchmarks.md).
    """

    def __init__(self, linear: _DynamicLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.inner = _DynamicLinear(self.in_features, self.out_features, bias_=False, dtype=torch.qint8)
        self.inner.set_weight_bias(linear.weight(), None)
        self._packed = self.inner._packed_params._packed_params
        bias = linear.bias()
        self.register_buffer(
            "bias", torch.zeros(self.out_features) if bias is None else bias.detach().clone()
        )
        pin = torch.zeros(1, self.in_features)
        pin[0, 0], pin[0, -1] = 1.0, -1.0
        self.register_buffer("pin", pin)

    def weight(self) -> torch.Tensor:
        """The quantized weight [out, in], one scale per output channel."""
        return self.inner.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        # A row of zeros gives the bias: any positive scale does.
        scale = torch.linalg.vector_norm(rows, math.inf, dim=-1, keepdim=True).clamp_min_(_TINY)
        # The op itself, not `self.inner(...)`: a decode step makes 25 (tiny) to 37 (base) of these calls.
        pinned = torch.cat([rows / scale, self.pin])
        out = torch.ops.quantized.linear_dynamic(pinned, self._packed, reduce_range=True)[:-1]
        return torch.addcmul(self.bias, out, scale).view(*x.shape[:-1], self.out_features)


def quantize_encoder_int8(
    encoder: nn.Module, keep_float: Sequence[str] = (), *, keep_factors: bool = False
) -> nn.Module:
    """The encoder part of `quantize_int8`, in place: every linear map in int8 but those named in `keep_float`
    (paths in the encoder, as `"layers.3.fc2"`) and, with `keep_factors`, the q/k/v factors that reduced-dimension
    attention reads.

    One activation scale per call covers a whole batch of 1,500-frame windows, so a map whose input carries
    massive activations (a few frames and channels hundreds of times larger than the rest) has everything else
    rounded away: in lite-whisper-base the fc2 of layer 3 (of 6) alone made the encoder's output error 13x larger
    (docs/compression.md). Compression finds such maps (`compress.int8_float_maps`).
    """
    maps = {
        name for name, module in encoder.named_modules() if isinstance(module, (nn.Linear, LowRankLinear))
    }
    if unknown := sorted(set(keep_float) - maps):
        raise CheckpointError(f"int8: no encoder map {', '.join(unknown)} to keep in float")
    for module in list(encoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LowRankLinear) and not (
                keep_factors and name in ("q_proj", "k_proj", "v_proj")
            ):
                setattr(module, name, _as_linears(child))
    quantized = {
        name: _INT8_QCONFIG
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear)
        and not any(name == k or name.startswith(f"{k}.") for k in keep_float)
    }
    with _quiet_quantization():
        torch.ao.quantization.quantize_dynamic(encoder, quantized, dtype=torch.qint8, inplace=True)
    return encoder


_INT8_QCONFIG = torch.ao.quantization.per_channel_dynamic_qconfig  # per tensor garbled lite-whisper-base


@contextlib.contextmanager
def _quiet_quantization() -> Iterator[None]:
    """torch deprecates dynamic quantization in favour of torchao, not yet a dependency here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=DeprecationWarning)
        yield


def fuse_linears(maps: Sequence[nn.Module]) -> nn.Module:
    """One linear map computing all of `maps` (same input) at once: their outputs side by side, in order.

    For a decode step at batch 1, a call costs more than its arithmetic (an int8 map also quantizes its input per
    call), so fusing a layer's q/k/v saves two calls of three. The results equal the separate maps': float maps
    compute the same dot products; int8 maps (`RowwiseInt8Linear`) keep their per-channel weights and would round
    the shared input the same way. The weights are copied (the maps stay as they are): for a decoder's q/k/v that
    is 7 MB on tiny, 19 MB on base in float32.
    """
    if all(type(m) is nn.Linear for m in maps):
        first = maps[0].weight
        fused = nn.Linear(
            maps[0].in_features, sum(m.out_features for m in maps), device=first.device, dtype=first.dtype
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in maps]))
            fused.bias.copy_(torch.cat([_bias(m) for m in maps]))
        return fused.requires_grad_(False)
    if all(type(m) is RowwiseInt8Linear for m in maps):
        weights = [m.weight() for m in maps]
        scales = torch.cat([w.q_per_channel_scales() for w in weights])
        zero_points = torch.cat([w.q_per_channel_zero_points() for w in weights])
        ints = torch.cat([w.int_repr() for w in weights])
        weight = torch._make_per_channel_quantized_tensor(ints, scales.double(), zero_points, 0)
        fused = _DynamicLinear(maps[0].in_features, weight.shape[0], dtype=torch.qint8)
        fused.set_weight_bias(weight, torch.cat([m.bias for m in maps]))
        return RowwiseInt8Linear(fused)
    raise TypeError(f"cannot fuse {sorted({type(m).__name__ for m in maps})}: expected all float or all int8")


def _bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)


def _as_linears(module: LowRankLinear) -> nn.Sequential:
    """The same map as two nn.Linear, which dynamic quantization knows: x W1 W2 + b.

    The rank-k intermediate holds the outputs' principal coordinates, whose scales fall by orders of magnitude
    from the first to the last; one int8 scale per call for all of them rounds the small ones away. Each
    coordinate j is rescaled by s_j = sqrt(|W1[:, j]| / |W2[j, :]|) (x W1 S^-1 . S W2, the same map), which
    evens out the intermediate's scales.
    """
    weight1, weight2 = module.weight1.detach(), module.weight2.detach()
    scale = (weight1.norm(dim=0) / weight2.norm(dim=1).clamp(min=1e-12)).sqrt().clamp(min=1e-12)
    first = nn.Linear(module.in_features, module.rank, bias=False)
    second = nn.Linear(module.rank, module.out_features)
    first.weight = nn.Parameter((weight1 / scale).T.contiguous())
    second.weight = nn.Parameter((weight2 * scale[:, None]).T.contiguous())
    second.bias = nn.Parameter(module.bias.detach().clone())
    return nn.Sequential(first, second)


def _describe(kind: str, keys: set) -> str:
    names = sorted(map(str, keys))
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"{len(names)} {kind.replace('_', ' ')} ({shown})"


AutoConfig.register(LiteWhisperConfig.model_type, LiteWhisperConfig, exist_ok=True)
AutoModel.register(LiteWhisperConfig, LiteWhisperForConditionalGeneration, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(LiteWhisperConfig, LiteWhisperForConditionalGeneration, exist_ok=True)
