"""The step engine: windows join and leave the decoder batch at every step.

`Scheduler.add` queues a window of at most 30 s. Each `run_once` is one iteration:

1. Admission. If slots are free, up to `encoder_batch` waiting windows are admitted: their encoder pass runs (one
   call for all of them), each decoder layer's cross-attention keys and values are written into each window's
   slot, its prompt is prefilled, and the first decoder position gives the no-speech probability and, when the
   language is not given, the language. The first token is chosen there too. Waiting windows are taken from the
   request (`key`) with the fewest windows admitted so far, so a short request that arrives while a long file is
   decoding starts at the next iteration instead of after the whole file. At most one encoder pass runs per
   iteration: decoding rows never wait for more than one encoder pass between two of their tokens.
2. One decode step: every active row advances by one token in one batched decoder call.
3. Rows that end (end token or token budget) leave at once. A degenerate row is decoded again at the next fallback
   temperature in the same slot: its encoder output and its prompt's keys and values are reused, only its tokens
   start over. A finished window's result is built by the rules of `liteasr.decoding`.

Failures stay local. An encoder pass that fails is retried window by window (out of memory: in halves); a decode
step that fails is retried row by row, and only a row that fails alone fails its window.

Not thread-safe: one caller (the service's worker thread, or `Engine.transcribe`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from liteasr.alignment import align_words
from liteasr.audio import SAMPLE_RATE
from liteasr.decoding import (
    Attempt,
    DecodeOptions,
    TokenEvent,
    WindowResult,
    Word,
    compression_ratio,
    find_repetition,
    first_period_end,
)
from liteasr.errors import OutOfMemoryError
from liteasr.logits import RowView
from liteasr.slots import CudaGraphSteps, DecoderSlots

__all__ = ["Finished", "Iteration", "PassStats", "Scheduler"]


@dataclass(frozen=True)
class Finished:
    """A window's result and how it got there."""

    window: int
    result: WindowResult
    admitted: float  # time.monotonic() when its encoder pass started
    finished: float
    max_rows: int  # most rows that shared a decode step with it


@dataclass(frozen=True)
class PassStats:
    seconds: float
    size: int  # windows in an encoder pass, rows in a decode step


@dataclass
class Iteration:
    """What one `run_once` did."""

    finished: list[Finished] = field(default_factory=list)
    failed: list[tuple[int, BaseException]] = field(default_factory=list)
    admitted: list[tuple[int, float]] = field(
        default_factory=list
    )  # (window, seconds it waited in the queue)
    tokens: list[TokenEvent] = field(default_factory=list)  # only for windows added with `listen=True`
    encoder: PassStats | None = None
    step: PassStats | None = None
    retries: list[str] = field(default_factory=list)  # "oom" or "error", one per failed pass that was retried


@dataclass(eq=False)
class _Window:
    id: int
    key: Hashable
    samples: np.ndarray
    options: DecodeOptions
    listen: bool
    enqueued: float


@dataclass(eq=False)
class _Group:
    """The waiting windows of one request (`key`)."""

    pending: deque[_Window] = field(default_factory=deque)
    admitted: int = 0


@dataclass(eq=False)
class _Row:
    window: _Window
    prompt: list[int]
    prompt_logits: torch.Tensor  # logits after the prompt: every attempt's first token comes from them
    language: str
    no_speech: float
    budget: int
    admitted: float
    ladder: tuple[float, ...] = (0.0,)  # the temperature of each attempt
    streams: bool = True  # a listener may see its tokens as they decode: it cannot be judged silent
    attempt: int = 0
    temperature: float = 0.0
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    first_attempt: Attempt | None = None  # kept: the answer when every attempt is degenerate
    looped: bool = False
    max_rows: int = 0

    def view(self) -> RowView:
        return RowView(self.tokens, self.window.options.timestamps, self.temperature, self.generator)


class Scheduler:
    """Continuous batching of windows over one engine's decoder slots."""

    def __init__(
        self, engine, *, max_rows: int = 8, encoder_batch: int = 1, cuda_graphs: bool = True
    ) -> None:
        if max_rows < 1 or encoder_batch < 1:
            raise ValueError("max_rows and encoder_batch must be at least 1")
        self.engine = engine
        self.guard = engine.guard
        self.rules = engine.rules
        self.max_rows = max_rows
        self.encoder_batch = encoder_batch
        self.slots = DecoderSlots(engine.model, max_rows)
        self._graphs: CudaGraphSteps | None = None
        if cuda_graphs and self.slots.device.type == "cuda":
            self._graphs = CudaGraphSteps(self.slots)
            self._graphs.capture()
        self._rows: list[_Row] = []  # row i lives in slot i
        self._groups: dict[Hashable, _Group] = {}  # insertion order = arrival order
        self._waiting = 0
        self._next_id = 0

    # -- the queue ------------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Windows queued for a slot."""
        return self._waiting

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    @property
    def idle(self) -> bool:
        return not self._rows and not self._waiting

    def add(
        self, samples: np.ndarray, options: DecodeOptions, *, key: Hashable = None, listen: bool = False
    ) -> int:
        """Queue one window of at most 30 s; returns its id. `key` groups the windows of one request (fairness,
        `cancel`); `listen`: report its tokens as they are decoded (`Iteration.tokens`), except while the window
        may yet be judged silent (no-speech probability above the loop guard's threshold): the text of such a
        window comes with its result only, so a listener never sees words that are then taken back."""
        if len(samples) > self.engine.window_samples:
            raise ValueError(
                f"a window holds at most {self.engine.window_samples} samples, got {len(samples)}"
            )
        window = _Window(self._next_id, key, samples, options, listen, time.monotonic())
        self._next_id += 1
        self._groups.setdefault(key, _Group()).pending.append(window)
        self._waiting += 1
        return window.id

    def cancel(self, key: Hashable) -> tuple[int, int]:
        """Forget every window of `key`: returns (queued windows dropped, decoding rows freed)."""
        group = self._groups.pop(key, None)
        dropped = len(group.pending) if group else 0
        self._waiting -= dropped
        leaving = [slot for slot, row in enumerate(self._rows) if row.window.key == key]
        self._free(leaving)
        return dropped, len(leaving)

    # -- one iteration --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_once(self) -> Iteration:
        """Admit waiting windows (at most one encoder pass), then advance every row by one token."""
        report = Iteration()
        free = self.max_rows - len(self._rows)
        if free and self._waiting:
            self._admit(self._take(min(free, self.encoder_batch)), report)
        if self._rows:
            self._step(report)
        return report

    def run_until_idle(self) -> list[Iteration]:
        reports = []
        while not self.idle:
            reports.append(self.run_once())
        return reports

    def _take(self, count: int) -> list[_Window]:
        taken = []
        while len(taken) < count and self._waiting:
            key, group = min(
                ((k, g) for k, g in self._groups.items() if g.pending), key=lambda item: item[1].admitted
            )
            taken.append(group.pending.popleft())
            group.admitted += 1
            self._waiting -= 1
            if not group.pending:
                del self._groups[key]
        return taken

    # -- admission ------------------------------------------------------------------------------------------

    def _admit(self, windows: list[_Window], report: Iteration) -> None:
        started = time.monotonic()
        encoded = self._encode(windows, report)
        report.encoder = PassStats(time.monotonic() - started, len(windows))
        for window, states in zip(windows, encoded, strict=True):
            report.admitted.append((window.id, started - window.enqueued))
            if isinstance(states, BaseException):
                report.failed.append((window.id, states))
                continue
            slot = len(self._rows)
            try:
                self.slots.write_cross(slice(slot, slot + 1), states[None])
                row = self._prefill(window, slot, started)
            except Exception as error:
                report.failed.append((window.id, _as_library_error(error)))
                continue
            self._rows.append(row)
            self._begin_attempt(row, report)

    def _encode(self, windows: list[_Window], report: Iteration) -> list[torch.Tensor | BaseException]:
        """Encoder states [frames, d_model] per window; a failed pass is retried in halves (out of memory) or
        window by window (any other error), and a window that fails alone gets its error."""
        try:
            return list(self.engine.encode([w.samples for w in windows]))
        except Exception as error:
            error = _as_library_error(error)
            if len(windows) == 1:
                return [error]
            report.retries.append("oom" if isinstance(error, OutOfMemoryError) else "error")
            self.engine.release_cached_memory()
            parts = (
                [windows[: len(windows) // 2], windows[len(windows) // 2 :]]
                if isinstance(error, OutOfMemoryError)
                else [[w] for w in windows]
            )
            return [states for part in parts for states in self._encode(part, report)]

    def _prefill(self, window: _Window, slot: int, admitted: float) -> _Row:
        engine, options = self.engine, window.options
        rows = slice(slot, slot + 1)
        language = options.language or ("en" if not engine.is_multilingual else None)
        previous = engine.previous_text(options.prompt)
        detected = language is None
        if detected:  # the start token alone decides the language (as in openai-whisper: no previous text)
            first = self._logits(rows, [engine.start_token], 0)
            language = engine.detect_language(first[0])
        prompt = engine.prompt(language, options)
        if detected and not previous:  # position 0 is written already: the prompt goes on from there
            no_speech_logits, after_prompt = first[0], self._logits(rows, prompt[1:], 1)[-1]
        else:
            logits = self._logits(rows, prompt, 0)
            # No-speech is read at the start token, after the previous text if there is one.
            no_speech_logits, after_prompt = logits[len(previous)], logits[-1]
        no_speech = float(no_speech_logits.float().softmax(dim=-1)[engine.no_speech_token])
        budget = min(
            self.guard.token_budget(len(window.samples) / SAMPLE_RATE), self.slots.max_positions - len(prompt)
        )
        row = _Row(window, prompt, after_prompt, language, no_speech, budget, admitted)
        row.streams = not self.guard.enabled or no_speech <= self.guard.no_speech_threshold
        row.ladder = options.ladder(self.guard)
        self._set_temperature(row)
        return row

    def _set_temperature(self, row: _Row) -> None:
        """The temperature of the row's current attempt; every sampled attempt starts from the same seed, so the
        same audio gives the same text whatever shares its steps."""
        row.temperature = row.ladder[row.attempt]
        row.generator = (
            torch.Generator(device=self.slots.device).manual_seed(self.guard.seed)
            if row.temperature > 0
            else None
        )

    def _logits(self, rows: slice, tokens: list[int], start: int) -> torch.Tensor:
        """Logits [T, vocab] of one row's `tokens` from position `start`."""
        device = self.slots.device
        hidden = self.slots.forward(
            rows, torch.tensor([tokens], device=device), torch.tensor([start], device=device)
        )
        return self.slots.logits(hidden[0])

    # -- decoding -------------------------------------------------------------------------------------------

    def _first_token(self, row: _Row) -> tuple[int, float]:
        """An attempt's first token, from the logits after the prompt (no decoder call)."""
        views = [row.view()]
        tokens, logprobs = self.rules.choose(self.rules.apply(row.prompt_logits[None], views), views)
        return tokens[0], logprobs[0]

    def _begin_attempt(self, row: _Row, report: Iteration) -> None:
        token, logprob = self._first_token(row)
        self._advance([row], [token], [logprob], report)

    def _step(self, report: Iteration) -> None:
        rows = list(self._rows)
        started = time.monotonic()
        try:
            tokens, logprobs = self._next_tokens(slice(0, len(rows)), rows)
        except Exception as error:  # again row by row: a row that fails alone fails its window
            report.retries.append(
                "oom" if isinstance(_as_library_error(error), OutOfMemoryError) else "error"
            )
            self.engine.release_cached_memory()
            tokens, logprobs, failed = [], [], []
            for slot, row in enumerate(rows):
                try:
                    [token], [logprob] = self._next_tokens(
                        torch.tensor([slot], device=self.slots.device), [row]
                    )
                except Exception as row_error:
                    report.failed.append((row.window.id, _as_library_error(row_error)))
                    failed.append(slot)
                    continue
                tokens.append(token)
                logprobs.append(logprob)
            self._free(failed)
            rows = [row for slot, row in enumerate(rows) if slot not in failed]
        report.step = PassStats(time.monotonic() - started, len(rows))
        for row in rows:
            row.max_rows = max(row.max_rows, report.step.size)
        self._advance(rows, tokens, logprobs, report)

    def _next_tokens(self, slots: slice | torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
        """One decoder call for `rows` (in `slots`: the active prefix, or one slot when retrying), the logit rules,
        and each row's next token with its log-probability."""
        device = self.slots.device
        tokens = torch.tensor([[row.tokens[-1]] for row in rows], device=device)
        start = torch.tensor([len(row.prompt) + len(row.tokens) - 1 for row in rows], device=device)
        if self._graphs is not None and isinstance(slots, slice):
            logits = self._graphs.step(tokens, start)
        else:
            logits = self.slots.logits(self.slots.forward(slots, tokens, start)[:, -1])
        views = [row.view() for row in rows]
        return self.rules.choose(self.rules.apply(logits, views), views)

    def _advance(self, rows: list[_Row], tokens: list[int], logprobs: list[float], report: Iteration) -> None:
        """Append each row's token. A row whose attempt ends either leaves (its result goes to `report`) or
        starts its next attempt at once, with that attempt's first token."""
        eos = self.engine.eos_token_id
        todo = list(zip(rows, tokens, logprobs, strict=True))
        leaving: set[int] = set()
        while todo:
            row, token, logprob = todo.pop()
            if token == eos:
                finished = True
            else:
                row.tokens.append(token)
                row.logprobs.append(logprob)
                if row.window.listen and row.streams:
                    report.tokens.append(TokenEvent(row.window.id, row.attempt, token))
                if len(row.tokens) < row.budget:
                    continue
                finished = False
            if self._end_attempt(row, finished, report):
                leaving.add(id(row))
            else:
                todo.append((row, *self._first_token(row)))
        if leaving:
            self._free([slot for slot, row in enumerate(self._rows) if id(row) in leaving])

    def _end_attempt(self, row: _Row, finished: bool, report: Iteration) -> bool:
        """After one attempt: True if the window is done (its result is in `report`), False if the row was reset
        for the next fallback temperature."""
        guard = self.guard
        attempt = Attempt(
            tuple(row.tokens),
            float(np.mean(row.logprobs)) if row.logprobs else 0.0,
            finished,
            row.temperature,
        )
        degenerate = attempt.degenerate(self.engine.text(attempt.tokens), guard)
        if row.attempt == 0:
            row.first_attempt, row.looped = attempt, degenerate
        retry = (
            degenerate
            and guard.enabled
            and row.attempt + 1 < len(row.ladder)
            and row.no_speech <= guard.no_speech_threshold
        )
        if retry:
            row.attempt += 1
            self._set_temperature(row)
            row.tokens, row.logprobs = [], []
            return False
        # Not degenerate: this attempt. Degenerate at every temperature: the first one, cut in `_result`.
        final = attempt if not degenerate else row.first_attempt
        try:
            result = self._result(row, final)
        except Exception as error:  # the word alignment's extra pass: only this window fails
            report.failed.append((row.window.id, _as_library_error(error)))
            return True
        report.finished.append(Finished(row.window.id, result, row.admitted, time.monotonic(), row.max_rows))
        return True

    def _free(self, slots: list[int]) -> None:
        """Remove the rows in `slots`, moving the last rows into the freed slots so active rows stay contiguous."""
        for slot in sorted(set(slots), reverse=True):
            last = len(self._rows) - 1
            if slot != last:
                moved = self._rows[last]
                self.slots.move(last, slot, len(moved.prompt) + len(moved.tokens))
                self._rows[slot] = moved
            self._rows.pop()

    # -- results --------------------------------------------------------------------------------------------

    def _result(self, row: _Row, attempt: Attempt) -> WindowResult:
        guard, engine = self.guard, self.engine
        tokens, cut = list(attempt.tokens), False
        # A loop that ran into the budget at every temperature: keep its first round only.
        if guard.enabled and not attempt.finished:
            start = find_repetition(tokens, guard.min_repeats)
            if start is not None:
                tokens, cut = tokens[: first_period_end(tokens, start)], True
        if guard.is_silent(row.no_speech, attempt.avg_logprob):
            tokens = []
        text = engine.text([t for t in tokens if t < engine.timestamp_begin]).strip()
        stats = {
            "avg_logprob": attempt.avg_logprob,
            "compression_ratio": compression_ratio(text),
            "no_speech_prob": row.no_speech,
            "temperature": attempt.temperature,
        }
        duration = len(row.window.samples) / SAMPLE_RATE
        options = row.window.options
        segments = engine.segments(tokens, stats, duration) if options.timestamps else ()
        text_tokens = [t for t in tokens if t < engine.eos_token_id]
        words = self._words(row, text_tokens, duration) if options.words and text_tokens else ()
        return WindowResult(
            text=text,
            language=row.language,
            segments=segments,
            tokens=tuple(tokens),
            looped=row.looped,
            cut=cut,
            words=words,
            **stats,
        )

    def _words(self, row: _Row, text_tokens: list[int], duration: float) -> tuple[Word, ...]:
        """Word times from the alignment heads: the text decoded once more in the row's slot (its cross-attention
        keys are still there), without timestamps or previous text, as openai-whisper aligns."""
        engine = self.engine
        start = engine.prompt(row.language, replace(row.window.options, prompt=None, timestamps=False))
        eot = engine.eos_token_id
        tokens = torch.tensor([*start, *text_tokens, eot], device=self.slots.device)
        scores, hidden = self.slots.cross_scores(self._rows.index(row), tokens, engine.alignment_heads)
        first = len(start) - 1  # <|notimestamps|>: its row predicts the first text token
        logits = self.slots.logits(hidden[first : first + len(text_tokens)])[:, :eot].float()
        chosen = logits.softmax(dim=-1)[torch.arange(len(text_tokens)), torch.tensor(text_tokens)]
        return align_words(
            scores.cpu(),
            text_tokens,
            chosen.tolist(),
            engine.raw_text,
            start_tokens=first,
            eot=eot,
            duration=duration,
            language=row.language,
        )


def _as_library_error(error: Exception) -> Exception:
    """CUDA out-of-memory as the library's own error, so callers need not know torch."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return OutOfMemoryError(str(error))
    return error
