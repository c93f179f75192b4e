"""Healing: a short label-free distillation of the low-rank factors against the original encoder.

Each factorization is optimal for its own map on the original model's inputs, but its errors compound through the
layers that follow, and a global budget that cuts attention maps compounds them faster. A few hundred steps of
gradient descent on the factors alone, with the original encoder's outputs on the calibration audio as the target,
recover most of it: tiny.en at 25% fewer encoder parameters goes from 51.7 to 35.7 capped per-utterance WER on
data/voices (dense: 33.9; docs/compression.md). No transcripts are needed.

Only the factors train (both weights and the bias of every `LowRankLinear`); every other tensor stays frozen, and is
shared with the original. The loss is the encoder output's squared distance to the original's over the frames that
hold audio, relative to the output's variance there; with `LogitDistillation` it adds the decoder's view: along the
original model's own greedy transcript of each window, the KL divergence from its next-token distributions to those
the (shared, frozen) decoder gives on the student's encoder output. Still no labels: the original transcribes. At
30% fewer parameters that term (weight 0.1, the default) took data/voices from 37.33 to 34.53 capped WER on tiny.en
(dense 33.87) and from 29.15 with a loop to 28.70 on base (dense 28.09; docs/compression.md). Windows are streamed from
disk batch by batch, so memory depends on the batch size, not on the number of clips; the window order comes from
the seed, so the same inputs give the same checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from liteasr.logits import LogitRules, RowView
from liteasr.modeling import LowRankLinear
from liteasr.slots import DecoderSlots

__all__ = ["HealReport", "LogitDistillation", "heal", "relative_output_error"]

WARMUP_STEPS = 10


@dataclass(frozen=True)
class HealReport:
    steps: int
    trained_parameters: int
    seconds: float
    first_loss: float  # the loss of the first batch, before its step
    last_loss: float  # mean over the last 10 steps


def relative_output_error(output: torch.Tensor, target: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Squared distance over the frames that hold audio, relative to the target's variance there."""
    target, output = target[frames], output[frames]
    return (output - target).square().sum() / (target - target.mean(dim=0)).square().sum().clamp(min=1e-12)


class LogitDistillation:
    """The decoder-logit term of the healing loss, from `model` (the original: its decoder is the student's too).

    For each window the original decodes greedily (the engine's logit rules, no timestamps; a multilingual model
    picks the language itself, as the engine does), keeping its log-probabilities at every position; the term is
    the mean KL divergence from those to the student's along the same tokens, times `weight`.
    """

    def __init__(self, model: WhisperForConditionalGeneration, weight: float, max_tokens: int = 128) -> None:
        gc = model.generation_config
        self.model = model
        self.weight = weight
        self.max_tokens = max_tokens
        self.eos = gc.eos_token_id
        self.start = gc.decoder_start_token_id
        self.languages = sorted((getattr(gc, "lang_to_id", None) or {}).values())
        task = (getattr(gc, "task_to_id", None) or {}).get("transcribe")
        self.after_language = ([] if task is None else [task]) + [gc.no_timestamps_token_id]
        device = next(model.parameters()).device
        self.rules = LogitRules(gc, model.config.vocab_size, device)
        self._slots: DecoderSlots | None = None

    @torch.no_grad()
    def targets(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The original's transcripts of encoder outputs `encoded` [n, frames, d]: (decoder inputs [n, P + L - 1]
        (prompt, then the text without its last token), which of the L text positions count (up to each row's
        first end-of-text) [n, L], the original's log-probabilities at those [count, vocab])."""
        n, device = encoded.shape[0], encoded.device
        if self._slots is None or self._slots.capacity < n:
            self._slots = DecoderSlots(self.model, capacity=n)
        slots, rows = self._slots, slice(0, n)
        slots.write_cross(rows, encoded.to(slots.dtype))

        def at(position: int) -> torch.Tensor:  # every row's start position
            return torch.full((n,), position, dtype=torch.long, device=device)

        prompt = torch.full((n, 1), self.start, device=device)
        rest = torch.tensor(self.after_language, device=device).expand(n, -1)
        if self.languages:  # the most likely language after the start token, as the engine detects it
            first = slots.logits(slots.forward(rows, prompt, at(0))[:, -1])
            ids = torch.tensor(self.languages, device=device)
            rest = torch.cat([ids[first[:, ids].argmax(-1)][:, None], rest], dim=1)
            hidden = slots.forward(rows, rest, at(1))
        else:
            hidden = slots.forward(rows, torch.cat([prompt, rest], dim=1), at(0))
        prompt = torch.cat([prompt, rest], dim=1)
        logits = slots.logits(hidden[:, -1])
        generated: list[list[int]] = [[] for _ in range(n)]
        log_probs, done = [], torch.zeros(n, dtype=torch.bool, device=device)
        # The decoder's positions bound the transcript too.
        end = min(prompt.shape[1] + self.max_tokens, slots.max_positions)
        for position in range(prompt.shape[1], end):
            scores = self.rules.apply(logits, [RowView(tokens, timestamps=False) for tokens in generated])
            log_probs.append(scores.log_softmax(-1))
            chosen = scores.argmax(-1).masked_fill(done, self.eos)
            for tokens, token in zip(generated, chosen.tolist(), strict=True):
                tokens.append(token)
            done |= chosen == self.eos
            if bool(done.all()):
                break
            logits = slots.logits(slots.forward(rows, chosen[:, None], at(position))[:, -1])
        text = torch.tensor(generated, device=device)  # [n, L]: tokens, then end-of-text (repeated)
        ended = (text == self.eos).cumsum(1) > 0
        counted = ~torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=1)
        teacher = torch.stack(log_probs, dim=1)[counted]
        return torch.cat([prompt, text[:, :-1]], dim=1), counted, teacher

    def loss(
        self, student_output: torch.Tensor, inputs: torch.Tensor, counted: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        """`weight` x the mean KL divergence from the original's distributions (`targets`) to the student's, whose
        gradient reaches the student's encoder through the frozen decoder."""
        hidden = self.model.model.decoder(
            input_ids=inputs, encoder_hidden_states=student_output
        ).last_hidden_state
        text = hidden[:, inputs.shape[1] - counted.shape[1] :]  # the positions that predict the L text tokens
        # The masks the original decoded with: suppressed tokens, and at the first text position the begin ones.
        scores = self.model.proj_out(text).float() + self.rules.suppress
        scores[:, 0] += self.rules.begin_suppress
        student = scores[counted].log_softmax(-1)
        kl = (teacher.exp() * (teacher - student)).nan_to_num(0.0, 0.0, 0.0)  # 0 where the original rules out
        return self.weight * kl.sum(-1).mean()


def factor_parameters(encoder: WhisperEncoder) -> list[torch.nn.Parameter]:
    return [
        p for module in encoder.modules() if isinstance(module, LowRankLinear) for p in module.parameters()
    ]


def heal(
    student: WhisperEncoder,
    teacher: WhisperEncoder,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    learning_rate: float,
    progress: Callable[[float], None] | None = None,
    distillation: LogitDistillation | None = None,
) -> HealReport:
    """Train `student`'s factors for `steps` batches of (mel features, audio-frame mask) towards `teacher`'s output
    (and, with `distillation`, towards its decoder's distributions).

    Both encoders (and the distillation's model) must be on the same device; the student trains in its own dtype
    (use float32). AdamW, a linear warm-up over the first steps, then cosine decay to zero.
    """
    trained = factor_parameters(student)
    if not trained:
        raise ValueError("the student has no low-rank maps to heal")
    frozen = {p: p.requires_grad for p in student.parameters()}
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / steps)),
    )
    dtype = next(student.parameters()).dtype
    was_training = student.training
    student.eval()  # no dropout: the loss is a regression on the teacher's deterministic output
    started = time.perf_counter()
    losses: list[float] = []
    try:
        for step in range(steps):
            features, frames = next(batches)
            with torch.no_grad():  # not inference_mode: the loss keeps the target for backward
                target = teacher(features.to(next(teacher.parameters()).dtype)).last_hidden_state
            output = student(features.to(dtype)).last_hidden_state
            loss = relative_output_error(output, target.to(dtype), frames)
            if distillation is not None:
                loss = loss + distillation.loss(output, *distillation.targets(target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress((step + 1) / steps)
    finally:
        for parameter, requires_grad in frozen.items():
            parameter.requires_grad_(requires_grad)
        student.train(was_training)
    tail = losses[-10:]
    return HealReport(
        steps=steps,
        trained_parameters=sum(p.numel() for p in trained),
        seconds=time.perf_counter() - started,
        first_loss=losses[0],
        last_loss=sum(tail) / len(tail),
    )
