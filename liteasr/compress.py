"""LiteASR compression of a Whisper encoder: calibrate, choose ranks, factorize, write a lite-whisper checkpoint.

Each encoder linear map (q/k/v/out projections, fc1 before GELU, fc2) may be replaced by a rank-k map that keeps
the top principal directions of its outputs on calibration audio (arXiv 2502.20583). Statistics are accumulated,
never stored: per map the output mean and covariance (d x d, float64) grow with the model, not with the
calibration set.

The non-obvious choice is which encoder frames count. Whisper pads every clip to a 30 s window. The reference
method counts all 1500 output frames alike, so for a 4 s clip seven frames in eight describe padding and the kept
directions are those of silence. Counting only the frames that hold audio fixes that for short requests, but when
every calibration clip is short, positions past the first few seconds never carry speech, and base loses whatever
a longer clip says there. The default ("mixed") counts the audio frames of every clip alone in its window and of
the clips packed back to back into full windows, and down-weights the few frames with massive activations that
packing creates at silences.

Which ranks: by default a global budget (liteasr.budget) keeps a fraction of the encoder's parameters and gives
every map, attention included, the rank that costs the encoder's output least, from one measured truncation per
map; thresholds per map family are the alternative. Then healing (liteasr.healing) trains the factors briefly
towards the original encoder's outputs, which recovers most of what truncation lost on voices it never heard.
docs/compression.md has the measurements.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from liteasr.audio import SAMPLE_RATE, load_audio, split_windows
from liteasr.budget import MapKey, OutputProbe, RankChoice, allocate, probe_rank, rank_choices, tail_shares
from liteasr.errors import CompressionError
from liteasr.healing import HealReport, LogitDistillation, factor_parameters, heal
from liteasr.manifest import Clip
from liteasr.modeling import (
    LOW_RANK_MAPS,
    LiteWhisperForConditionalGeneration,
    LowRankLinear,
    encoder_parameters,
    factorize_linear,
    load_model,
    quantize_encoder_int8,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "METHODS",
    "CompressOptions",
    "CompressionReport",
    "MapStatistics",
    "ProgressCallback",
    "choose_rank",
    "collect_statistics",
    "compress",
    "compress_checkpoint",
    "encoder_flops",
    "int8_float_maps",
    "parse_thresholds",
    "principal_components",
    "select_clips",
]

ProgressCallback = Callable[[str, float], None]
# Windows the int8 probe runs on (one clip alone, one packed window): massive activations are a property of the
# model, not of the audio: on tiny.en and base two calibration windows picked the maps that eight clips of
# data/voices did, in 8 s and 26 s on 2 cores.
INT8_PROBE_WINDOWS = 2

# Which encoder frames the statistics count:
# mixed: the frames that hold audio, of every clip alone in its window (as short requests are served) and of the
#   clips packed back to back into full windows (as long audio is), so that speech reaches every position.
# packed, speech: one of those two passes only.
# reference: the paper. Every clip alone in its window, all frames counted, padding included.
METHODS = ("mixed", "packed", "speech", "reference")

ATTENTION_MAPS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_MAPS = ("fc1", "fc2")


# Energy to keep per map; a map not named stays dense. The paper's setting ("0.99:0.999") is the reference default.
# Ours factorizes fc1 and fc2 only: on voices outside the calibration set q/k/v/out cost far more accuracy per
# parameter saved (docs/compression.md has the sweep).
DEFAULT_THRESHOLDS: Mapping[str, Mapping[str, float]] = {
    "reference": {
        "q_proj": 0.99,
        "k_proj": 0.99,
        "v_proj": 0.99,
        "out_proj": 0.99,
        "fc1": 0.999,
        "fc2": 0.999,
    },
    "speech": {"fc1": 0.99, "fc2": 0.95},
    "packed": {"fc1": 0.99, "fc2": 0.95},
    "mixed": {"fc1": 0.99, "fc2": 0.95},
}


def parse_thresholds(text: str) -> dict[str, float]:
    """Thresholds from text: "ATTN:MLP" (the paper's form: q/k/v/out and fc1/fc2) or "map=t,map=t,..." by map name.

    A map left out of the named form stays dense, as does one given a threshold of 1.
    """
    text = text.strip()
    try:
        if "=" in text:
            pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
            thresholds = {name.strip(): float(value) for name, value in pairs}
        else:
            attn, mlp = (float(part) for part in text.split(":"))
            thresholds = {name: attn for name in ATTENTION_MAPS} | {name: mlp for name in MLP_MAPS}
    except ValueError:
        raise CompressionError(
            f"cannot read thresholds {text!r}: expected ATTN:MLP (e.g. 0.99:0.999) or map=value pairs "
            "(e.g. fc1=0.99,fc2=0.95)"
        ) from None
    return thresholds


@dataclass(frozen=True)
class CompressOptions:
    """How to compress. `CompressOptions()` is the recommended setting (docs/compression.md)."""

    method: str = "mixed"  # one of METHODS
    # Energy (fraction of output variance) to keep, per map name; a map not named, or given 1.0, stays dense.
    # None: DEFAULT_THRESHOLDS[method].
    thresholds: Mapping[str, float] | None = None
    max_clips: int | None = 64  # calibration clips used, chosen by `select_clips`; None: all
    seed: int = 0  # clip choice
    batch_size: int = 8  # 30 s windows per encoder pass during calibration
    device: str = "cpu"  # where calibration runs ("cpu", "cuda", "cuda:1")
    dtype: str = "float32"  # calibration dtype; factorization is float64 and the output keeps the base dtype
    rank_multiple: int = 16  # ranks are multiples of this
    speech_margin_frames: int = 2  # frames counted past the end of the audio (the conv stack's reach)
    pack_gap_seconds: float = 0.3  # silence between packed clips (methods "mixed", "packed")
    # Frames farther from the mean than this many median distances are down-weighted (MapStatistics.update);
    # None: every frame counts fully. Method "reference" ignores it, as the paper has no such step.
    outlier_factor: float | None = 4.0
    low_rank_attention: bool = False  # set config.low_rank_attention (liteasr.attention)
    # Fraction of the encoder's parameters to keep: the rank of every map in `budget_maps` is chosen together from
    # measured sensitivity (liteasr.budget). Used when `thresholds` is None; given thresholds replace it.
    # None: the method's thresholds.
    budget: float | None = 0.7
    budget_maps: tuple[str, ...] = LOW_RANK_MAPS  # the maps a budget may factorize
    probe_windows: int = 8  # calibration windows the budget measures sensitivity on (half alone, half packed)
    heal_steps: int = 100  # batches of healing (liteasr.healing) after factorization; 0: none
    heal_learning_rate: float = 3e-4
    heal_batch_size: int = 4  # 30 s windows per healing step
    # Weight of healing's decoder-logit term (liteasr.healing.LogitDistillation: the original model's own greedy
    # transcripts, no labels); 0: the encoder output alone. About 1.6x the healing time.
    heal_logit_weight: float = 0.1
    # An encoder map stays in float under int8 (`LITEASR_INT8=all`; config.int8_float_maps) where quantizing it alone
    # adds at least this share of the encoder output error that quantizing every map adds (`int8_float_maps`).
    # None: no int8 probe.
    int8_float_share: float | None = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CompressionError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.thresholds is not None:
            object.__setattr__(self, "budget", None)
        if self.budget is not None:
            if not 0.0 < self.budget < 1.0:
                raise CompressionError(
                    f"the budget is the fraction of parameters to keep, in (0, 1); got {self.budget}"
                )
            if not self.budget_maps or set(self.budget_maps) - set(LOW_RANK_MAPS):
                raise CompressionError(
                    f"budget_maps must name maps among {LOW_RANK_MAPS}, got {self.budget_maps}"
                )
            object.__setattr__(self, "budget_maps", tuple(n for n in LOW_RANK_MAPS if n in self.budget_maps))
        if (
            self.probe_windows < 1
            or self.heal_steps < 0
            or self.heal_batch_size < 1
            or self.heal_learning_rate <= 0
            or self.heal_logit_weight < 0
        ):
            raise CompressionError(
                "probe_windows and heal_batch_size must be positive, heal_steps and heal_logit_weight >= 0, "
                "heal_learning_rate > 0"
            )
        if self.int8_float_share is not None and not 0.0 < self.int8_float_share <= 1.0:
            raise CompressionError(f"int8_float_share must be in (0, 1] or None, got {self.int8_float_share}")
        if self.budget is None:  # with a budget, thresholds stay None, so that `replace` keeps the budget
            self._fill_thresholds()
        if self.max_clips is not None and self.max_clips < 1:
            raise CompressionError(f"max_clips must be positive or None, got {self.max_clips}")
        if (
            self.batch_size < 1
            or self.rank_multiple < 1
            or self.speech_margin_frames < 0
            or self.pack_gap_seconds < 0
        ):
            raise CompressionError(
                "batch_size and rank_multiple must be positive, speech_margin_frames and pack_gap_seconds >= 0"
            )
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise CompressionError(f"dtype must be float32, float16, bfloat16 or float64, got {self.dtype!r}")

    def _fill_thresholds(self) -> None:
        thresholds = dict(DEFAULT_THRESHOLDS[self.method] if self.thresholds is None else self.thresholds)
        if unknown := sorted(set(thresholds) - set(LOW_RANK_MAPS)):
            raise CompressionError(
                f"thresholds name unknown maps {unknown}; expected names among {LOW_RANK_MAPS}"
            )
        for name, value in thresholds.items():
            if not 0.0 < value <= 1.0:
                raise CompressionError(f"the threshold of {name} must be in (0, 1], got {value}")
        # A private copy in map order, so the options cannot change behind the caller's back.
        ordered = {name: float(thresholds[name]) for name in LOW_RANK_MAPS if name in thresholds}
        object.__setattr__(self, "thresholds", ordered)

    def threshold(self, name: str) -> float:
        """The energy to keep in map `name`; 1.0 means dense."""
        return 1.0 if self.thresholds is None else self.thresholds.get(name, 1.0)

    @property
    def factorized_maps(self) -> tuple[str, ...]:
        """The maps whose statistics count: those a budget may factorize, or those with a threshold below 1."""
        if self.budget is not None or self.thresholds is None:
            return self.budget_maps
        return tuple(name for name, value in self.thresholds.items() if value < 1.0)

    @property
    def pack_gaps(self) -> tuple[float | None, ...]:
        """One calibration pass per entry: None puts every clip alone in its window, a number packs them."""
        gap = self.pack_gap_seconds
        return {"mixed": (None, gap), "packed": (gap,)}.get(self.method, (None,))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class MapStatistics:
    """Running weighted mean and covariance of one map's outputs, in float64.

    Rows are shifted by the first batch's mean before they are summed, so the covariance does not lose precision
    to a large mean (outputs of q_proj and fc1 have one).
    """

    shift: torch.Tensor | None = None  # [d]
    total: torch.Tensor | None = None  # [d] weighted sum of shifted rows
    gram: torch.Tensor | None = None  # [d, d] weighted sum of outer products of shifted rows
    weight: float = 0.0  # sum of row weights
    count: int = 0  # rows seen

    def update(self, rows: torch.Tensor, outlier_factor: float | None = None) -> None:
        """Add rows [n, d] (any float dtype and device).

        With `outlier_factor` c, a row farther than c times the batch's median distance from the batch's mean is
        down-weighted so that its squared distance counts as (c x median distance)^2: a few frames with massive
        activations cannot take over the principal directions.
        """
        if rows.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = rows.double().mean(dim=0)
            d = rows.shape[1]
            self.total = torch.zeros(d, dtype=torch.float64, device=rows.device)
            self.gram = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
        shifted = rows.double() - self.shift
        scaled = shifted.float()
        if outlier_factor is None:
            self.total += shifted.sum(dim=0)
            self.weight += rows.shape[0]
        else:
            distance = (scaled - scaled.mean(dim=0)).norm(dim=1)
            bound = outlier_factor * distance.median().clamp(min=torch.finfo(torch.float32).tiny)
            weights = (bound / distance.clamp(min=bound)).square()
            self.total += weights.double() @ shifted
            self.weight += float(weights.sum(dtype=torch.float64))
            scaled = scaled * weights.sqrt()[:, None]
        # The product runs in float32 (fast on every device); the shift keeps it well conditioned and the
        # float64 accumulator keeps the sum over many batches exact enough.
        self.gram += (scaled.T @ scaled).double()
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        self._check()
        return self.shift + self.total / self.weight

    @property
    def covariance(self) -> torch.Tensor:
        """Weighted population covariance of the rows (divided by the weight sum)."""
        self._check()
        m = self.total / self.weight
        cov = self.gram / self.weight - torch.outer(m, m)
        return (cov + cov.T) / 2

    def _check(self) -> None:
        if self.count == 0:
            raise CompressionError("no calibration frames reached this map")


def principal_components(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a covariance, in float64.

    Signs are fixed (the largest entry of each vector is positive), so the same statistics always give the same
    factors.
    """
    values, vectors = torch.linalg.eigh(covariance.double().cpu())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return values, vectors * signs


def choose_rank(
    energies: torch.Tensor | Sequence[float],
    threshold: float,
    in_features: int,
    out_features: int,
    multiple: int = 16,
) -> tuple[int | None, float]:
    """The smallest multiple of `multiple` whose leading energies reach `threshold` of the total.

    Returns (rank, energy kept), or (None, 1.0) when the map should stay dense: the threshold is only reached with
    every direction, or the factors would have as many parameters as the dense map (k (in + out) >= in out). A map
    whose outputs are constant (zero total energy) gets the smallest rank.
    """
    values = torch.as_tensor(energies, dtype=torch.float64).clamp(min=0)
    d = values.numel()
    total = float(values.sum())
    cumulative = values.cumsum(0)
    rank = None
    for k in range(multiple, d, multiple):
        if total == 0.0 or float(cumulative[k - 1]) >= threshold * total:
            rank = k
            break
    if rank is None or rank * (in_features + out_features) >= in_features * out_features:
        return None, 1.0
    return rank, 1.0 if total == 0.0 else float(cumulative[rank - 1]) / total


def select_clips(clips: Sequence[Clip], max_clips: int | None, seed: int = 0) -> list[Clip]:
    """At most `max_clips` clips, drawn in turn from each speaker (shuffled with `seed`) so every voice counts.

    A manifest lists one voice after another; its first N clips would often be a single voice.
    """
    if max_clips is None or len(clips) <= max_clips:
        return list(clips)
    rng = random.Random(seed)
    by_speaker: dict[str, list[Clip]] = {}
    for clip in clips:
        by_speaker.setdefault(clip.speaker, []).append(clip)
    queues = []
    for speaker in sorted(by_speaker):
        group = list(by_speaker[speaker])
        rng.shuffle(group)
        queues.append(group)
    chosen: list[Clip] = []
    while len(chosen) < max_clips:
        for queue in queues:
            if queue and len(chosen) < max_clips:
                chosen.append(queue.pop(0))
    return chosen


def _encoder(model: WhisperForConditionalGeneration | WhisperEncoder) -> WhisperEncoder:
    return model if isinstance(model, WhisperEncoder) else model.model.encoder


def _encoder_maps(
    model: WhisperForConditionalGeneration | WhisperEncoder,
) -> dict[tuple[int, str], nn.Module]:
    maps = {}
    for index, layer in enumerate(_encoder(model).layers):
        for name in LOW_RANK_MAPS:
            owner = layer if name.startswith("fc") else layer.self_attn
            maps[(index, name)] = getattr(owner, name)
    return maps


def _windows(
    audios: Sequence[np.ndarray | Clip], window_seconds: float, pack_gap_seconds: float | None
) -> Iterator[tuple[np.ndarray, int]]:
    """Windows of at most `window_seconds` and how many clips are done, reading each clip only when its turn comes.

    With `pack_gap_seconds` set, consecutive clips share a window, `pack_gap_seconds` of silence apart, so that
    speech reaches every position of the window. A clip longer than a window is cut at quiet points first.
    """
    limit = int(window_seconds * SAMPLE_RATE)
    pack: list[np.ndarray] = []
    packed = 0
    gap = np.zeros(int((pack_gap_seconds or 0.0) * SAMPLE_RATE), dtype=np.float32)
    for done, audio in enumerate(audios, start=1):
        samples = load_audio(audio.audio) if isinstance(audio, Clip) else np.asarray(audio, dtype=np.float32)
        for window in split_windows(
            samples, window_seconds=window_seconds, search_seconds=window_seconds / 6
        ):
            if pack_gap_seconds is None:
                yield window.samples, done
                continue
            if pack and packed + len(window.samples) > limit:
                yield np.concatenate(pack[:-1])[:limit], done - 1
                pack, packed = [], 0
            pack += [window.samples, gap]
            packed += len(window.samples) + len(gap)
    if pack:
        yield np.concatenate(pack[:-1])[:limit], len(audios)  # no gap after the last clip


def _window_batches(
    audios: Sequence[np.ndarray | Clip],
    window_seconds: float,
    pack_gap_seconds: float | None,
    batch_size: int,
) -> Iterator[tuple[list[np.ndarray], int]]:
    batch: list[np.ndarray] = []
    for window, done in _windows(audios, window_seconds, pack_gap_seconds):
        batch.append(window)
        if len(batch) == batch_size:
            yield batch, done
            batch = []
    if batch:
        yield batch, len(audios)


def _featurize(
    batch: Sequence[np.ndarray],
    extractor: WhisperFeatureExtractor,
    options: CompressOptions,
    window_frames: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel features of a batch of windows, and which encoder frames count (method "reference": all of them)."""
    features = extractor(list(batch), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    if options.method == "reference":
        return features, torch.ones(len(batch), window_frames, dtype=torch.bool)
    frame_samples = 2 * extractor.hop_length  # the stride-2 conv halves the mel frame rate: 20 ms
    mask = torch.zeros(len(batch), window_frames, dtype=torch.bool)
    for row, samples in enumerate(batch):
        n = math.ceil(len(samples) / frame_samples) + options.speech_margin_frames
        mask[row, : max(1, min(window_frames, n))] = True
    return features, mask


def _extractor_for(
    encoder: WhisperEncoder, extractor: WhisperFeatureExtractor | None
) -> WhisperFeatureExtractor:
    extractor = extractor or WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
    window_frames = encoder.config.max_source_positions  # encoder frames per window (1500 for 30 s)
    if extractor.nb_max_frames != 2 * window_frames:
        raise CompressionError(
            f"the feature extractor makes {extractor.nb_max_frames} mel frames per window, the encoder expects "
            f"{2 * window_frames}"
        )
    return extractor


def collect_statistics(
    model: WhisperForConditionalGeneration | WhisperEncoder,
    audios: Sequence[np.ndarray | Clip],
    options: CompressOptions,
    *,
    feature_extractor: WhisperFeatureExtractor | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[dict[tuple[int, str], MapStatistics], dict[str, int]]:
    """Run the encoder over calibration audio and accumulate the output statistics of every map to factorize.

    `model` (a Whisper model or its encoder) must already be on the calibration device and dtype. Audio longer than one window (30 s) is cut into
    windows. Returns the statistics keyed (layer, map name) and counts {"clips", "windows", "frames"}, frames being
    the rows each map's statistics saw. `progress("calibrate", fraction)` is called after every batch.
    """
    if not audios:
        raise CompressionError("no calibration audio")
    encoder = _encoder(model)
    extractor = _extractor_for(encoder, feature_extractor)
    window_frames = encoder.config.max_source_positions
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    maps = {
        key: module for key, module in _encoder_maps(encoder).items() if key[1] in options.factorized_maps
    }
    stats = {key: MapStatistics() for key in maps}
    selected: list[torch.Tensor | None] = [None]  # the current batch's frame mask, read by the hooks
    outlier_factor = None if options.method == "reference" else options.outlier_factor

    def hook_for(key: tuple[int, str]):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            mask = selected[0]
            rows = output.reshape(-1, output.shape[-1]) if mask is None else output[mask]
            stats[key].update(rows.detach(), outlier_factor)

        return hook

    pack_gaps = options.pack_gaps
    handles = [module.register_forward_hook(hook_for(key)) for key, module in maps.items()]
    frames = windows = 0
    try:
        with torch.inference_mode():
            for step, pack_gap in enumerate(pack_gaps):
                batches = _window_batches(audios, extractor.chunk_length, pack_gap, options.batch_size)
                for batch, clips_done in batches:
                    features, mask = _featurize(batch, extractor, options, window_frames)
                    frames += int(mask.sum())
                    selected[0] = None if options.method == "reference" else mask.to(device)
                    encoder(features.to(device, dtype))
                    windows += len(batch)
                    if progress is not None:
                        progress("calibrate", (step + clips_done / len(audios)) / len(pack_gaps))
    finally:
        for handle in handles:
            handle.remove()
    return stats, {"clips": len(audios), "windows": windows, "frames": frames}


def encoder_flops(config: Any, ranks: Sequence[Mapping[str, int]] | None = None) -> int:
    """Floating-point operations (2 per multiply-add) of one encoder pass over a 30 s window.

    Counts the two convolutions, every linear map (dense, or k (in + out) per frame when low-rank) and the
    attention products (scores and weighted values); layer norms, GELU and softmax are left out.
    """
    frames, d, ffn = config.max_source_positions, config.d_model, config.encoder_ffn_dim
    mel_frames = 2 * frames
    macs = mel_frames * config.num_mel_bins * d * 3 + frames * d * d * 3  # conv1, conv2 (stride 2)
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d), "fc1": (d, ffn)}
    shapes["fc2"] = (ffn, d)
    for index in range(config.encoder_layers):
        layer_ranks = ranks[index] if ranks else {}
        for name, (d_in, d_out) in shapes.items():
            rank = layer_ranks.get(name)
            macs += frames * (d_in * d_out if rank is None else rank * (d_in + d_out))
        macs += 2 * frames * frames * d  # QK^T and AV over all heads
    return 2 * macs


@dataclass(frozen=True)
class MapReport:
    rank: int | None  # None: kept dense
    energy_kept: float  # fraction of output variance in the kept directions (1.0 when dense)
    in_features: int
    out_features: int
    parameters_before: int
    parameters_after: int
    sensitivity: float | None = None  # with a budget: output error per share of energy lost (liteasr.budget)
    predicted_error: float | None = None  # with a budget: this map's predicted share of the output error


@dataclass(frozen=True)
class Int8Report:
    """Relative encoder output errors of int8 against the float encoder, on the probe windows."""

    float_maps: list[str]  # left in float under int8 (config.int8_float_maps)
    error_all: float  # every map in int8
    error: float  # with float_maps in float
    alone: dict[str, float]  # per map: the error with that map alone in int8


@dataclass(frozen=True)
class CompressionReport:
    method: str
    options: dict[str, Any]
    layers: list[dict[str, MapReport]]  # per encoder layer, per map name
    encoder_parameters_before: int
    encoder_parameters_after: int
    encoder_flops_before: int  # per 30 s window
    encoder_flops_after: int
    clips: int
    windows: int
    frames: int  # calibration frames per map
    wall_seconds: float
    peak_rss_bytes: int  # of this process, over its life so far
    cuda_max_allocated_bytes: int | None  # during compression; None off CUDA
    low_rank_attention_layers: list[int] = field(default_factory=list)  # q and k ranks below the head dim
    base: str | None = None  # where the base model came from, when known
    # Relative encoder output error on the probe windows (liteasr.budget): predicted from the allocation, measured
    # after factorization, and after healing. None where no budget or healing asked for a probe.
    predicted_output_error: float | None = None
    output_error: float | None = None
    healed_output_error: float | None = None
    heal: HealReport | None = None
    int8: Int8Report | None = None  # None where options.int8_float_share is None

    @property
    def parameter_reduction(self) -> float:
        return 1.0 - self.encoder_parameters_after / self.encoder_parameters_before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parameter_reduction"] = self.parameter_reduction
        data["flops_reduction"] = 1.0 - self.encoder_flops_after / self.encoder_flops_before
        data["layers"] = [
            {name: ("dense" if m.rank is None else m.rank) for name, m in layer.items()}
            for layer in self.layers
        ]
        data["maps"] = [{name: asdict(m) for name, m in layer.items()} for layer in self.layers]
        return data

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _calibration_encoder(model: WhisperForConditionalGeneration, options: CompressOptions) -> WhisperEncoder:
    """The encoder on the calibration device and dtype: the model's own when it is there already, else a copy."""
    encoder = model.model.encoder
    weight = next(encoder.parameters())
    device, dtype = torch.device(options.device), options.torch_dtype
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressionError(f"device {options.device!r} was asked for, but no CUDA GPU is available")
    if weight.device == device and weight.dtype == dtype:
        return encoder
    return copy.deepcopy(encoder).to(device=device, dtype=dtype)


def compress(
    base_model: WhisperForConditionalGeneration,
    clips: Sequence[Clip | np.ndarray],
    options: CompressOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    feature_extractor: WhisperFeatureExtractor | None = None,
) -> tuple[LiteWhisperForConditionalGeneration, CompressionReport]:
    """Compress `base_model`'s encoder with statistics from `clips` (Clip rows or 16 kHz float32 audio).

    `base_model` is left as it is; the lite model shares its untouched tensors (clone it first to modify either)
    and keeps its device and dtype. `progress(stage, fraction)` is called with stages "calibrate", "sensitivity"
    (with a budget), "factorize", "heal" (with healing) and "int8" (with the int8 probe).
    """
    options = options or CompressOptions()
    started = time.perf_counter()
    if options.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(options.device)
    clips = list(clips)
    if options.max_clips is not None and all(isinstance(c, Clip) for c in clips):
        clips = select_clips(clips, options.max_clips, options.seed)
    elif options.max_clips is not None:
        clips = clips[: options.max_clips]
    if not clips:
        raise CompressionError("no calibration clips")
    extractor = _extractor_for(base_model.model.encoder, feature_extractor)
    was_training = base_model.training
    base_model.eval()
    try:
        calibration = _calibration_encoder(base_model, options)
        stats, counts = collect_statistics(
            calibration, clips, options, feature_extractor=extractor, progress=progress
        )
        probe = None
        if options.budget is not None or options.heal_steps:
            probe = OutputProbe(calibration, *_probe_windows(clips, extractor, options, calibration.config))
        dense_maps = _encoder_maps(base_model)
        components = {
            key: principal_components(map_stats.covariance)
            for key, map_stats in stats.items()
            if isinstance(dense_maps[key], nn.Linear)
        }
        allocation, sensitivity = {}, {}
        if options.budget is not None:
            assert probe is not None
            allocation, sensitivity = _allocate(
                base_model, calibration, stats, components, probe, options, progress
            )

        low_rank: dict[MapKey, LowRankLinear] = {}
        layers: list[dict[str, MapReport]] = [{} for _ in base_model.model.encoder.layers]
        for done, ((index, name), module) in enumerate(dense_maps.items(), start=1):
            d_in, d_out = module.in_features, module.out_features
            before = sum(p.numel() for p in module.parameters())
            rank, kept = None, 1.0
            if (index, name) in components:
                values, vectors = components[(index, name)]
                if options.budget is None:
                    rank, kept = choose_rank(
                        values, options.threshold(name), d_in, d_out, options.rank_multiple
                    )
                else:
                    rank = allocation[(index, name)].rank
                    kept = 1.0 if rank is None else 1.0 - float(tail_shares(values)[rank])
                if rank is not None:
                    low_rank[(index, name)] = factorize_linear(
                        module, vectors[:, :rank], stats[(index, name)].mean
                    )
            if isinstance(module, LowRankLinear):  # already factorized in the base: reported as it is
                rank = module.rank
            after = before if rank is None else rank * (d_in + d_out) + d_out
            choice = allocation.get((index, name))
            layers[index][name] = MapReport(
                rank,
                kept,
                d_in,
                d_out,
                before,
                after,
                sensitivity=sensitivity.get((index, name)),
                predicted_error=None if choice is None else choice.predicted_error,
            )
            if progress is not None:
                progress("factorize", done / len(dense_maps))
        lite = LiteWhisperForConditionalGeneration.from_whisper(
            base_model, low_rank, low_rank_attention=options.low_rank_attention
        )
        output_error = healed_output_error = heal_report = None
        if probe is not None:
            output_error = probe.model_error(_student_encoder(lite, options))
        if options.heal_steps and low_rank:
            student = _student_encoder(lite, options)
            heal_report = heal(
                student,
                calibration,
                _heal_batches(clips, extractor, options, calibration.config),
                steps=options.heal_steps,
                learning_rate=options.heal_learning_rate,
                progress=None if progress is None else lambda fraction: progress("heal", fraction),
                distillation=_distillation(base_model, options),
            )
            assert probe is not None
            healed_output_error = probe.model_error(student)
            if student is not lite.model.encoder:
                with torch.no_grad():
                    for kept_factor, trained in zip(
                        factor_parameters(lite.model.encoder), factor_parameters(student), strict=True
                    ):
                        kept_factor.copy_(trained)
        int8 = None
        if options.int8_float_share is not None:
            int8_windows = replace(options, probe_windows=INT8_PROBE_WINDOWS)
            features, frames = _probe_windows(clips, extractor, int8_windows, calibration.config)
            int8 = int8_float_maps(
                lite.model.encoder,
                features,
                frames,
                options.int8_float_share,
                keep_factors=options.low_rank_attention,
                progress=None if progress is None else lambda fraction: progress("int8", fraction),
            )
            lite.config.int8_float_maps = int8.float_maps
    finally:
        base_model.train(was_training)
    del calibration

    ranks = lite.config.low_rank_config
    head_dim = lite.config.d_model // lite.config.encoder_attention_heads
    report = CompressionReport(
        method=options.method,
        options=asdict(options),
        layers=layers,
        encoder_parameters_before=encoder_parameters(base_model),
        encoder_parameters_after=encoder_parameters(lite),
        encoder_flops_before=encoder_flops(
            base_model.config, getattr(base_model.config, "low_rank_config", None)
        ),
        encoder_flops_after=encoder_flops(lite.config, ranks),
        clips=counts["clips"],
        windows=counts["windows"],
        frames=counts["frames"],
        wall_seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss_bytes(),
        cuda_max_allocated_bytes=(
            torch.cuda.max_memory_allocated(options.device) if options.device.startswith("cuda") else None
        ),
        low_rank_attention_layers=[
            i
            for i, r in enumerate(ranks)
            if r.get("q_proj", head_dim) < head_dim and r.get("k_proj", head_dim) < head_dim
        ],
        predicted_output_error=(
            sum(c.predicted_error for c in allocation.values()) if options.budget is not None else None
        ),
        output_error=output_error,
        healed_output_error=healed_output_error,
        heal=heal_report,
        int8=int8,
    )
    return lite, report


def int8_float_maps(
    encoder: nn.Module,
    features: torch.Tensor,
    frames: torch.Tensor,
    share: float,
    *,
    keep_factors: bool = False,
    progress: Callable[[float], None] | None = None,
) -> Int8Report:
    """The encoder maps that int8 must leave in float, measured on `features` (on the CPU, where int8 runs): a map
    stays in float where quantizing it alone adds at least `share` of the output error that quantizing every map
    (`modeling.quantize_encoder_int8`) adds. Massive activations (a few frames and channels far larger than the
    rest) sit in the inputs of one or two maps, and one int8 scale per call cannot hold them.
    """
    reference = copy.deepcopy(encoder).to(device="cpu", dtype=torch.float32)
    probe = OutputProbe(reference, features.to("cpu", torch.float32), frames.cpu())
    maps = [
        name
        for name, module in reference.named_modules()
        if isinstance(module, (nn.Linear, LowRankLinear))
        and name.startswith("layers.")
        and not (
            keep_factors
            and isinstance(module, LowRankLinear)
            and name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")
        )
    ]

    def error_with_all_but(keep: Sequence[str]) -> float:
        quantized = quantize_encoder_int8(copy.deepcopy(reference), keep, keep_factors=keep_factors)
        return probe.model_error(quantized)

    error_all = error_with_all_but(())
    alone = {}
    for done, name in enumerate(maps, start=1):
        parent, attribute = name.rsplit(".", 1)
        holder = reference.get_submodule(parent)
        original = getattr(holder, attribute)
        setattr(holder, attribute, quantize_encoder_int8(nn.Sequential(copy.deepcopy(original)))[0])
        try:
            alone[name] = probe.error_from(int(name.split(".")[1]))
        finally:
            setattr(holder, attribute, original)
        if progress is not None:
            progress(done / (len(maps) + 1))
    kept = sorted((n for n in maps if alone[n] >= share * error_all), key=lambda n: -alone[n])
    error = error_with_all_but(kept) if kept else error_all
    if progress is not None:
        progress(1.0)
    return Int8Report(kept, error_all, error, alone)


def _probe_windows(
    clips: Sequence[Clip | np.ndarray],
    extractor: WhisperFeatureExtractor,
    options: CompressOptions,
    config: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `probe_windows` calibration windows, shared out between the method's passes (alone, packed)."""
    features, masks = [], []
    gaps = options.pack_gaps
    for number, gap in enumerate(gaps):
        wanted = options.probe_windows // len(gaps) + (number < options.probe_windows % len(gaps))
        for batch, _ in _window_batches(clips, extractor.chunk_length, gap, wanted):
            batch_features, mask = _featurize(batch, extractor, options, config.max_source_positions)
            features.append(batch_features)
            masks.append(mask)
            break
    device = torch.device(options.device)
    return torch.cat(features).to(device, options.torch_dtype), torch.cat(masks).to(device)


def _allocate(
    base_model: WhisperForConditionalGeneration,
    calibration: WhisperEncoder,
    stats: Mapping[MapKey, MapStatistics],
    components: Mapping[MapKey, tuple[torch.Tensor, torch.Tensor]],
    probe: OutputProbe,
    options: CompressOptions,
    progress: ProgressCallback | None,
) -> tuple[dict[MapKey, RankChoice], dict[MapKey, float]]:
    """Every budgeted map's rank, from one truncation probe per map, and the sensitivities measured."""
    assert options.budget is not None
    maps = _encoder_maps(calibration)
    dense = _encoder_maps(base_model)
    choices: dict[MapKey, list[RankChoice]] = {}
    sensitivity: dict[MapKey, float] = {}
    for done, (key, (values, vectors)) in enumerate(components.items(), start=1):
        rank = probe_rank(values, options.rank_multiple)
        lost = float(tail_shares(values)[rank])
        error = probe.error(maps, {key: (stats[key].mean, vectors[:, :rank])})
        sensitivity[key] = error / lost if lost > 0 else 0.0
        module = dense[key]
        choices[key] = rank_choices(
            values,
            sum(p.numel() for p in module.parameters()),
            module.in_features,
            sensitivity[key],
            options.rank_multiple,
        )
        if progress is not None:
            progress("sensitivity", done / len(components))
    fixed = encoder_parameters(base_model) - sum(choices[key][0].parameters for key in choices)
    available = math.floor(options.budget * encoder_parameters(base_model)) - fixed
    return allocate(choices, available), sensitivity


def _student_encoder(lite: LiteWhisperForConditionalGeneration, options: CompressOptions) -> WhisperEncoder:
    """The lite encoder to heal: its own on the calibration device in float32, else a float32 copy there."""
    encoder = lite.model.encoder
    weight = next(encoder.parameters())
    if weight.device == torch.device(options.device) and weight.dtype == torch.float32:
        return encoder
    return copy.deepcopy(encoder).to(device=options.device, dtype=torch.float32)


def _distillation(
    base_model: WhisperForConditionalGeneration, options: CompressOptions
) -> LogitDistillation | None:
    """Healing's decoder-logit term, with the original's decoder in float32 on the calibration device."""
    if not options.heal_logit_weight:
        return None
    if getattr(base_model.generation_config, "no_timestamps_token_id", None) is None:
        raise CompressionError(
            "healing's decoder-logit term decodes with Whisper's generation settings, which this model lacks "
            "(no generation_config.json with no_timestamps_token_id): add them, or set heal_logit_weight to 0"
        )
    weight = next(base_model.parameters())
    teacher = base_model
    if weight.device != torch.device(options.device) or weight.dtype != torch.float32:
        teacher = copy.deepcopy(base_model).to(device=options.device, dtype=torch.float32)
    return LogitDistillation(teacher, options.heal_logit_weight)


def _heal_batches(
    clips: Sequence[Clip | np.ndarray],
    extractor: WhisperFeatureExtractor,
    options: CompressOptions,
    config: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Healing batches without end: epoch after epoch over the clips in a seeded order, each epoch one of the
    method's passes (alone, packed) in turn, read from disk as they come."""
    rng = random.Random(options.seed)
    device = torch.device(options.device)
    epoch = 0
    while True:
        order = list(clips)
        rng.shuffle(order)
        gap = options.pack_gaps[epoch % len(options.pack_gaps)]
        for batch, _ in _window_batches(order, extractor.chunk_length, gap, options.heal_batch_size):
            features, mask = _featurize(batch, extractor, options, config.max_source_positions)
            yield features.to(device), mask.to(device)
        epoch += 1


_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def compress_checkpoint(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    clips: Sequence[Clip | np.ndarray],
    options: CompressOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CompressionReport:
    """Compress the Whisper checkpoint in `base_dir` and write a lite-whisper checkpoint to `out_dir`.

    Writes the model (config, safetensors and the remote-code files), the base's processor files and generation
    config, and `compression_report.json`. The checkpoint is built beside `out_dir` and moved into place at the end,
    so an existing `out_dir` is replaced only by a complete one. Stages reported: "calibrate", "factorize", "save".
    """
    options = options or CompressOptions()
    started = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not clips:
        raise CompressionError("no calibration clips")
    if out_dir.resolve() == base_dir.resolve():
        raise CompressionError(f"the output directory {out_dir} is the base checkpoint itself")
    base = load_model(base_dir, device="cpu", dtype=torch.float32)
    extractor = WhisperFeatureExtractor.from_pretrained(base_dir)
    lite, report = compress(base, clips, options, progress=progress, feature_extractor=extractor)
    if progress is not None:
        progress("save", 0.0)
    build = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        lite.save_pretrained(build)
        for name in _PROCESSOR_FILES:  # the generation config too: the base's exact file
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, build / name)
        report = replace(report, base=str(base_dir), wall_seconds=time.perf_counter() - started)
        report.write(build / "compression_report.json")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build.rename(out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if progress is not None:
        progress("save", 1.0)
    return report
