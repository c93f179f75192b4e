"""Whisper's logit rules, applied to every row of a decode step at once, then the choice of each row's token.

The rules and their order are those of transformers' Whisper `generate` (itself openai-whisper's): tokens suppressed
at the first position (`begin_suppress_tokens`), tokens never emitted (`suppress_tokens`), then, for rows that asked
for timestamps, the timestamp rules (pairs, monotonic, the first token a timestamp of at most
`max_initial_timestamp_index`, and a timestamp forced when the timestamps together are more likely than any text
token). The masks are built once per model; a step applies them with a handful of batched tensor operations whatever
the number of rows, instead of one pass of Python per row and rule.

Greedy rows take the arg-max. Sampling rows (fallback temperatures) draw from the full tempered distribution with
their own generator, so a fallback's text depends on its own audio only, never on which rows share its step. The
log-probability recorded for a token is that of the filtered, untempered distribution (openai-whisper's
`avg_logprob`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LogitRules", "RowView"]


@dataclass(frozen=True)
class RowView:
    """What the rules need to know of one row at this step."""

    generated: Sequence[int]  # tokens generated so far in this attempt (prompt excluded)
    timestamps: bool
    temperature: float = 0.0
    generator: torch.Generator | None = None  # for temperature > 0


class LogitRules:
    """The suppress masks and the timestamp rules of one model, on its device."""

    def __init__(self, generation_config, vocab_size: int, device: torch.device) -> None:
        gc = generation_config
        self.vocab_size = vocab_size
        self.device = device
        self.eos = gc.eos_token_id
        self.no_timestamps = gc.no_timestamps_token_id
        self.timestamp_begin = gc.no_timestamps_token_id + 1
        self.max_initial_timestamp = getattr(gc, "max_initial_timestamp_index", None)
        self.suppress = self._bias(getattr(gc, "suppress_tokens", None) or ())
        self.begin_suppress = self._bias(getattr(gc, "begin_suppress_tokens", None) or ())
        self._vocab = torch.arange(vocab_size, device=device)

    def _bias(self, tokens: Sequence[int]) -> torch.Tensor:
        bias = torch.zeros(self.vocab_size, device=self.device)
        ids = [t for t in tokens if 0 <= t < self.vocab_size]
        bias[ids] = -float("inf")
        return bias

    def apply(self, logits: torch.Tensor, rows: Sequence[RowView]) -> torch.Tensor:
        """The filtered float32 logits of every row (`logits`: [rows, vocab], any float dtype)."""
        scores = logits.float() + self.suppress
        first = [i for i, row in enumerate(rows) if not row.generated]
        if first:
            scores[first] += self.begin_suppress
        timed = [i for i, row in enumerate(rows) if row.timestamps]
        if timed:
            scores[timed] = self._timestamp_rules(scores[timed], [rows[i].generated for i in timed])
        return scores

    def _timestamp_rules(self, scores: torch.Tensor, generated: Sequence[Sequence[int]]) -> torch.Tensor:
        begin, vocab, inf = self.timestamp_begin, self._vocab, -float("inf")
        pair_closed, pair_open, floors, at_start = [], [], [], []
        for seq in generated:
            last = len(seq) >= 1 and seq[-1] >= begin
            penultimate = len(seq) < 2 or seq[-2] >= begin
            pair_closed.append(last and penultimate)  # two timestamps in a row: text must follow
            pair_open.append(last and not penultimate)  # a segment just ended: a timestamp or the end
            stamps = [t for t in seq if t >= begin]
            # Timestamps never go back; after a closed pair they also never repeat (no second <|0.00|>).
            floors.append(begin if not stamps else stamps[-1] if last and not penultimate else stamps[-1] + 1)
            at_start.append(not seq)
        device = scores.device
        pair_closed_t = torch.tensor(pair_closed, device=device)[:, None]
        pair_open_t = torch.tensor(pair_open, device=device)[:, None]
        floors_t = torch.tensor(floors, device=device)[:, None]
        at_start_t = torch.tensor(at_start, device=device)[:, None]
        is_timestamp = vocab >= begin
        forbidden = (
            (vocab == self.no_timestamps)
            | (pair_closed_t & is_timestamp)
            | (pair_open_t & (vocab < self.eos))
            | (is_timestamp & (vocab < floors_t))
            | (at_start_t & ~is_timestamp)
        )
        if self.max_initial_timestamp is not None:
            forbidden |= at_start_t & (vocab > begin + self.max_initial_timestamp)
        scores = scores.masked_fill(forbidden, inf)
        logprobs = scores.log_softmax(dim=-1)
        timestamp_wins = logprobs[:, begin:].logsumexp(dim=-1) > logprobs[:, :begin].max(dim=-1).values
        return scores.masked_fill(timestamp_wins[:, None] & ~is_timestamp, inf)

    def choose(self, scores: torch.Tensor, rows: Sequence[RowView]) -> tuple[list[int], list[float]]:
        """Each row's next token and its log-probability, from filtered scores."""
        logprobs = scores.log_softmax(dim=-1)
        # max's indices, not argmax: the same first maximum, 2-3x faster over a 51,865-token vocabulary on the CPU.
        tokens = scores.max(dim=-1).indices
        sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
        if sampled:
            tokens = tokens.clone()
            for i in sampled:
                probs = (scores[i] / rows[i].temperature).softmax(dim=-1)
                tokens[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        return tokens.tolist(), chosen.tolist()
