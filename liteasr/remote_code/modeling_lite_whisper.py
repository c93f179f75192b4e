"""Lite-whisper models: Whisper whose encoder maps named in `config.low_rank_config` are low-rank (LiteASR).

Copied beside the weights of every saved checkpoint (see `auto_map` in config.json): torch and transformers imports
only. Everything but the factorized encoder maps is Whisper's own code, so the decoder, SDPA and `generate` behave
as in Whisper.
"""

import math

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import (
    WhisperEncoder,
    WhisperForConditionalGeneration,
    WhisperModel,
)

from .configuration_lite_whisper import LiteWhisperConfig

__all__ = [
    "LiteWhisperEncoder",
    "LiteWhisperForConditionalGeneration",
    "LiteWhisperModel",
    "LowRankLinear",
]


class LowRankLinear(nn.Module):
    """`y = (x @ weight1) @ weight2 + bias`, a rank-`rank` stand-in for `nn.Linear(in_features, out_features)`.

    The factors are stored as [in, rank] and [rank, out] (not nn.Linear's [out, in]): that is the published
    layout. The bias is always present, so a factorized k_proj gains one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.weight1 = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.weight2 = nn.Parameter(torch.empty(rank, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory))
        self.reset_parameters()

    @classmethod
    def from_factors(
        cls, weight1: torch.Tensor, weight2: torch.Tensor, bias: torch.Tensor
    ) -> "LowRankLinear":
        """Wrap given factors (copied), checking that their shapes chain."""
        if weight1.dim() != 2 or weight2.dim() != 2 or bias.dim() != 1:
            raise ValueError(
                "expected weight1 [in, rank], weight2 [rank, out], bias [out]; got shapes "
                f"{tuple(weight1.shape)}, {tuple(weight2.shape)}, {tuple(bias.shape)}"
            )
        (in_features, rank), out_features = weight1.shape, bias.shape[0]
        if weight2.shape != (rank, out_features):
            raise ValueError(
                f"weight2 must be [rank, out] = {[rank, out_features]} to follow weight1 {list(weight1.shape)} and "
                f"bias {list(bias.shape)}, got {list(weight2.shape)}"
            )
        module = cls(in_features, out_features, rank, device="meta", dtype=weight1.dtype)
        module.weight1 = nn.Parameter(weight1.detach().clone())
        module.weight2 = nn.Parameter(weight2.detach().to(weight1, copy=True))
        module.bias = nn.Parameter(bias.detach().to(weight1, copy=True))
        return module

    def reset_parameters(self) -> None:
        # Outputs on nn.Linear's default scale (a random model stays usable); checkpoints overwrite it.
        nn.init.uniform_(self.weight1, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        nn.init.uniform_(self.weight2, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowRankLinear expects {self.in_features} input features, got input of shape {tuple(x.shape)}"
            )
        return (x @ self.weight1) @ self.weight2 + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LiteWhisperEncoder(WhisperEncoder):
    """Whisper's encoder with the maps in `config.low_rank_config` replaced by `LowRankLinear`."""

    config_class = LiteWhisperConfig

    def __init__(self, config: LiteWhisperConfig) -> None:
        super().__init__(config)
        for layer, ranks in zip(self.layers, config.low_rank_config, strict=True):
            for name, rank in ranks.items():
                owner = layer if name.startswith("fc") else layer.self_attn
                dense = getattr(owner, name)
                factory = {"device": dense.weight.device, "dtype": dense.weight.dtype}
                setattr(owner, name, LowRankLinear(dense.in_features, dense.out_features, rank, **factory))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LowRankLinear):
            module.reset_parameters()
        else:
            super()._init_weights(module)


class LiteWhisperModel(WhisperModel):
    config_class = LiteWhisperConfig

    def __init__(self, config: LiteWhisperConfig) -> None:
        super().__init__(config)
        self.encoder = LiteWhisperEncoder(config)
        self.post_init()


class LiteWhisperForConditionalGeneration(WhisperForConditionalGeneration):
    config_class = LiteWhisperConfig

    def __init__(self, config: LiteWhisperConfig) -> None:
        super().__init__(config)
        self.model = LiteWhisperModel(config)
        self.post_init()
