"""The decoder the step engine replaced, kept as the reference of tests and benchmarks (never on a request path).

`GenerateReference` decodes windows the way the engine did before the step engine: one static batch per (task,
timestamps) group through transformers' `model.generate`, the first-step pass for language and no-speech, and the
same loop guard (fallback temperatures on the rows that look degenerate, the cut, the silence rules). Its greedy
tokens are what the step engine must reproduce; its fallbacks sampled with one seed for the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from liteasr.audio import SAMPLE_RATE
from liteasr.decoding import (
    Attempt,
    DecodeOptions,
    WindowResult,
    compression_ratio,
    find_repetition,
    first_period_end,
)
from liteasr.engine import Engine

__all__ = ["GenerateReference"]


class GenerateReference:
    """`Engine.transcribe_windows` through `model.generate`, as before the step engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.guard = engine.guard

    @torch.inference_mode()
    def transcribe_windows(self, windows, options) -> list[WindowResult]:
        results: list[WindowResult | None] = [None] * len(windows)
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, option in enumerate(options):
            groups.setdefault((option.task, option.timestamps), []).append(index)
        for (task, timestamps), indices in groups.items():
            group = self._decode_group(
                [windows[i] for i in indices], [options[i].language for i in indices], task, timestamps
            )
            for index, result in zip(indices, group, strict=True):
                results[index] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def greedy_tokens(self, windows, options: DecodeOptions) -> list[tuple[int, ...]]:
        """Plain greedy tokens of each window (no loop guard), one generate call."""
        engine = self.engine
        encoded = engine.encode(windows)
        languages = self._languages([options.language] * len(windows), self._first_step_logits(encoded))
        budgets = self._budgets(windows, languages[0], options)
        rows = self._generate(encoded, languages, options.task, options.timestamps, budgets, temperature=0.0)
        return [row.tokens for row in rows]

    def _decode_group(self, windows, languages, task, timestamps) -> list[WindowResult]:
        engine, guard = self.engine, self.guard
        encoded = engine.encode(windows)
        first_logits = self._first_step_logits(encoded)
        no_speech = first_logits.softmax(dim=-1)[:, engine.no_speech_token].tolist()
        languages = self._languages(languages, first_logits)
        budgets = self._budgets(windows, languages[0], DecodeOptions(task=task, timestamps=timestamps))
        final = self._generate(encoded, languages, task, timestamps, budgets, temperature=0.0)
        looped = [row.degenerate(engine.text(row.tokens), guard) for row in final]
        retry = [i for i, bad in enumerate(looped) if bad and no_speech[i] <= guard.no_speech_threshold]
        for temperature in guard.temperatures if guard.enabled else ():
            if not retry:
                break
            candidates = self._generate(
                encoded[retry],
                [languages[i] for i in retry],
                task,
                timestamps,
                [budgets[i] for i in retry],
                temperature=temperature,
            )
            still_bad = []
            for i, candidate in zip(retry, candidates, strict=True):
                if candidate.degenerate(engine.text(candidate.tokens), guard):
                    still_bad.append(i)
                else:
                    final[i] = candidate
            retry = still_bad
        results = []
        for i, attempt in enumerate(final):
            tokens, cut = list(attempt.tokens), False
            if guard.enabled and not attempt.finished:
                start = find_repetition(tokens, guard.min_repeats)
                if start is not None:
                    tokens, cut = tokens[: first_period_end(tokens, start)], True
            if guard.is_silent(no_speech[i], attempt.avg_logprob):
                tokens = []
            text = engine.text([t for t in tokens if t < engine.timestamp_begin]).strip()
            stats = {
                "avg_logprob": attempt.avg_logprob,
                "compression_ratio": compression_ratio(text),
                "no_speech_prob": no_speech[i],
                "temperature": attempt.temperature,
            }
            duration = len(windows[i]) / SAMPLE_RATE
            segments = engine.segments(tokens, stats, duration) if timestamps else ()
            results.append(
                WindowResult(
                    text=text,
                    language=languages[i],
                    segments=segments,
                    tokens=tuple(tokens),
                    looped=looped[i],
                    cut=cut,
                    **stats,
                )
            )
        return results

    def _budgets(self, windows, language: str, options: DecodeOptions) -> list[int]:
        """The loop guard's budget, within the decoder's positions (as the step engine caps it)."""
        room = self.engine.model.config.max_target_positions - len(self.engine.prompt(language, options))
        return [min(self.guard.token_budget(len(w) / SAMPLE_RATE), room) for w in windows]

    def _first_step_logits(self, encoded: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        start = torch.full((encoded.shape[0], 1), engine.start_token, device=engine.device)
        out = engine.model(encoder_outputs=(encoded,), decoder_input_ids=start, use_cache=False)
        return out.logits[:, -1].float()

    def _languages(self, languages, first_logits) -> list[str]:
        engine = self.engine
        if not engine.is_multilingual:
            return ["en"] * len(languages)
        return [
            language or engine.detect_language(logits)
            for language, logits in zip(languages, first_logits, strict=True)
        ]

    def _generate(self, encoded, languages, task, timestamps, budgets, *, temperature) -> list[Attempt]:
        engine = self.engine
        kwargs = {"language": languages, "task": task} if engine.is_multilingual else {}
        sampling = temperature > 0
        with torch.random.fork_rng(devices=[engine.device] if engine.device.type == "cuda" else []):
            if sampling:
                torch.manual_seed(self.guard.seed)
            out = engine.model.generate(
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
        steps = len(out.scores)
        generated = out.sequences[:, -steps:] if steps else out.sequences[:, :0]
        logprobs = torch.stack([s.float().log_softmax(dim=-1) for s in out.scores], dim=1) if steps else None
        rows = []
        for row, budget in enumerate(budgets):
            tokens, token_logprobs, finished = [], [], False
            for step in range(min(budget, generated.shape[1])):
                token = int(generated[row, step])
                if token == engine.eos_token_id:
                    finished = True
                    break
                tokens.append(token)
                token_logprobs.append(float(logprobs[row, step, token]))
            else:  # as before: a row cut at its budget had finished if the next token was the end
                finished = generated.shape[1] > budget and int(generated[row, budget]) == engine.eos_token_id
            avg = float(np.mean(token_logprobs)) if token_logprobs else 0.0
            rows.append(Attempt(tuple(tokens), avg, finished, temperature))
        return rows
