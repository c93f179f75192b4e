"""A global rank budget: every encoder map's rank chosen together, from measured sensitivity.

Truncating one map's outputs to their top k principal directions loses the tail of its eigenvalues. What that costs
downstream depends on where the map sits: on tiny.en the same share of lost energy moves the encoder's output 100
times more through the first layer's out_proj than through any q_proj. To first order the encoder's output error is
that map's factor times its lost energy, so one truncation per map (`OutputProbe.map_sensitivity`) measures the
factor, and the errors of several truncated maps add up (tiny.en at 25% fewer parameters: 0.057 predicted, 0.050
measured). `allocate` then picks, for every map at once, the ranks with the least predicted error that fit the
budget: a Lagrangian search over each map's choices, topped up greedily to use what is left.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from liteasr.errors import CompressionError

__all__ = [
    "MapKey",
    "OutputProbe",
    "RankChoice",
    "allocate",
    "rank_choices",
    "tail_shares",
]

MapKey = tuple[int, str]  # (encoder layer, map name)
Projection = tuple[torch.Tensor, torch.Tensor]  # (output mean [d], kept directions [d, k])

# Probe rank: where this share of a map's output energy is lost. Small enough for the first-order model to hold,
# large enough for the error to stand out of float32 noise.
PROBE_TAIL = 0.03


@dataclass(frozen=True)
class RankChoice:
    rank: int | None  # None: dense
    parameters: int  # of the map with this rank, bias included
    predicted_error: float  # added to the encoder's relative output error


def tail_shares(values: torch.Tensor) -> torch.Tensor:
    """`tail[k]`: the share of the energy beyond the first k eigenvalues (descending), for k = 0..d."""
    values = values.double().clamp(min=0)
    total = float(values.sum())
    tail = torch.cat([values.flip(0).cumsum(0).flip(0), values.new_zeros(1)])
    return tail / total if total > 0 else torch.zeros_like(tail)


def probe_rank(values: torch.Tensor, multiple: int) -> int:
    tail = tail_shares(values)
    d = values.numel()
    return next(
        (k for k in range(multiple, d, multiple) if float(tail[k]) <= PROBE_TAIL), max(multiple, d - multiple)
    )


def rank_choices(
    values: torch.Tensor, dense_parameters: int, in_features: int, sensitivity: float, multiple: int
) -> list[RankChoice]:
    """Dense, and every multiple of `multiple` whose factors are smaller than the dense map."""
    tail = tail_shares(values)
    out_features = values.numel()
    choices = [RankChoice(None, dense_parameters, 0.0)]
    for k in range(multiple, out_features, multiple):
        parameters = k * (in_features + out_features) + out_features
        if parameters < dense_parameters:
            choices.append(RankChoice(k, parameters, sensitivity * float(tail[k])))
    return choices


def allocate(choices: Mapping[MapKey, Sequence[RankChoice]], available: int) -> dict[MapKey, RankChoice]:
    """The choice per map with the least total predicted error whose parameters add up to at most `available`."""
    smallest = sum(min(c.parameters for c in options) for options in choices.values())
    if smallest > available:
        raise CompressionError(
            f"the budget leaves {available} parameters for the maps to factorize; their smallest ranks need "
            f"{smallest}: raise the budget"
        )

    def pick(price: float) -> dict[MapKey, RankChoice]:
        return {
            key: min(options, key=lambda c: (c.predicted_error + price * c.parameters, c.parameters))
            for key, options in choices.items()
        }

    def size(picked: Mapping[MapKey, RankChoice]) -> int:
        return sum(c.parameters for c in picked.values())

    low, high = 0.0, 1e-12
    while size(pick(high)) > available:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        if size(pick(middle)) > available:
            low = middle
        else:
            high = middle
    picked = pick(high)
    # Ties and the jump from dense to the largest rank can leave room: spend it where it buys the most.
    while True:
        room = available - size(picked)
        upgrades = [
            (
                (picked[key].predicted_error - c.predicted_error)
                / max(1, c.parameters - picked[key].parameters),
                key,
                c,
            )
            for key, options in choices.items()
            for c in options
            if c.predicted_error < picked[key].predicted_error
            and 0 < c.parameters - picked[key].parameters <= room
        ]
        if not upgrades:
            return picked
        _, key, choice = max(upgrades, key=lambda u: u[0])
        picked[key] = choice


class OutputProbe:
    """The encoder's output on a few calibration windows, and how far truncating some maps moves it.

    The input of every layer is kept, so a probe of a map in layer i runs layers i.. only. The error is the squared
    distance to the original output over the frames that hold audio, relative to the output's variance there.
    """

    def __init__(self, encoder: WhisperEncoder, features: torch.Tensor, frames: torch.Tensor) -> None:
        self.encoder = encoder
        self.features = features
        self.frames = frames
        inputs: dict[int, torch.Tensor] = {}

        def keep(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:
                inputs[index] = args[0].detach()

            return hook

        handles = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(encoder.layers)]
        try:
            with torch.inference_mode():
                reference = encoder(features).last_hidden_state[frames]
        finally:
            for handle in handles:
                handle.remove()
        self.inputs = inputs
        self.reference = reference
        self.variance = float((reference - reference.mean(dim=0)).square().sum())

    def model_error(self, encoder: WhisperEncoder) -> float:
        """Relative output error of another encoder (a compressed one) on the same windows."""
        with torch.inference_mode():
            output = encoder(self.features.to(next(encoder.parameters()).dtype)).last_hidden_state[
                self.frames
            ]
        return float((output.to(self.reference.dtype) - self.reference).square().sum()) / self.variance

    def error(self, maps: Mapping[MapKey, nn.Module], projections: Mapping[MapKey, Projection]) -> float:
        """Relative output error with each map in `projections` truncated to its kept directions."""
        if not projections:
            return 0.0

        def truncate(mean: torch.Tensor, directions: torch.Tensor) -> Callable[..., torch.Tensor]:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                centred = output - mean
                return mean + (centred @ directions) @ directions.T

            return hook

        dtype = self.reference.dtype
        handles = [
            maps[key].register_forward_hook(truncate(mean.to(dtype), directions.to(dtype)))
            for key, (mean, directions) in projections.items()
        ]
        try:
            return self.error_from(min(index for index, _ in projections))
        finally:
            for handle in handles:
                handle.remove()

    def error_from(self, first: int) -> float:
        """Relative output error of the probe's encoder as it is now (a map swapped, hooked), running layers
        `first`.. from their kept inputs."""
        with torch.inference_mode():
            hidden = self.inputs[first]
            for layer in self.encoder.layers[first:]:
                hidden = layer(hidden, None)
            output = self.encoder.layer_norm(hidden)[self.frames]
        return float((output - self.reference).square().sum()) / self.variance
