"""Word timestamps from cross-attention, the way openai-whisper (`timing.py`) and faster-whisper compute them.

After a window is decoded, its text tokens are run through the decoder once more (without timestamps or previous
text) and the cross-attention scores of the model's alignment heads (the generation config's `alignment_heads`) are
kept. Softmax over the frames that hold audio, a z-score per head over the tokens, a median filter along time,
the mean over heads: a token x frame similarity. Dynamic time warping through it gives each token the frames
it was heard in; sub-word tokens are merged into words (on spaces; on characters for languages written without
them), punctuation joins its word, and overlong words are capped the way openai-whisper caps them.

The DTW is librosa's (compiled with numba): the same recurrence as openai-whisper's, same step pattern.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from liteasr.decoding import Word

__all__ = ["FRAMES_PER_SECOND", "align_words", "split_words", "warm_up"]

FRAMES_PER_SECOND = 50  # encoder frames: 20 ms each
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_ENDS = ".。!！?？"
# Languages written without spaces between words: split on characters instead.
UNSPACED_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


@dataclass
class _Timing:
    text: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def align_words(
    scores: torch.Tensor,
    text_tokens: Sequence[int],
    probabilities: Sequence[float],
    decode: Callable[[Sequence[int]], str],
    *,
    start_tokens: int,
    eot: int,
    duration: float,
    language: str = "en",
) -> tuple[Word, ...]:
    """Words of one window, times in seconds from its start.

    `scores`: the alignment heads' cross-attention scores before the softmax, [heads, tokens, frames], of the
    sequence start, language, task (`start_tokens` of them), <|notimestamps|>, the text tokens, the end token.
    `probabilities`: each text token's probability. `decode`: token ids -> text, special tokens kept.
    """
    if not text_tokens:
        return ()
    frames = max(1, min(scores.shape[-1], round(duration * FRAMES_PER_SECOND)))
    weights = scores[:, :, :frames].float().softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = _median_filter((weights - mean) / std.clamp_min(1e-8), MEDIAN_FILTER_WIDTH)
    # Rows of <|notimestamps|> and the text tokens: the row before a token's is where it is predicted.
    matrix = weights.mean(dim=0)[start_tokens:-1].numpy().astype(np.float64)
    text_indices, time_indices = _dtw(-matrix)

    words, word_tokens = split_words([*text_tokens, eot], decode, language=language, eot=eot)
    if len(word_tokens) <= 1:
        return ()
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / FRAMES_PER_SECOND
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    probabilities = np.asarray(probabilities, dtype=np.float64)
    timings = [
        _Timing(text, tokens, float(start), float(end), float(probabilities[i:j].mean()))
        for text, tokens, start, end, i, j in zip(
            words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:], strict=False
        )
    ]
    _cap_long_words(timings)
    _merge_punctuation(timings)
    return tuple(
        Word(
            start=round(min(t.start, duration), 3),
            end=round(min(t.end, duration), 3),
            text=t.text,
            probability=t.probability,
        )
        for t in timings
        if t.text
    )


def split_words(
    tokens: Sequence[int], decode: Callable[[Sequence[int]], str], *, language: str, eot: int
) -> tuple[list[str], list[list[int]]]:
    """Tokens grouped into words: a word starts at a token that begins with a space, at punctuation, or at a
    special token (characters instead, for languages written without spaces)."""
    subwords, subword_tokens = _split_on_characters(tokens, decode)
    if language in UNSPACED_LANGUAGES:
        return subwords, subword_tokens
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for subword, pieces in zip(subwords, subword_tokens, strict=True):
        if pieces[0] >= eot or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
            words.append(subword)
            word_tokens.append(list(pieces))
        else:
            words[-1] += subword
            word_tokens[-1].extend(pieces)
    return words, word_tokens


def _split_on_characters(
    tokens: Sequence[int], decode: Callable[[Sequence[int]], str]
) -> tuple[list[str], list[list[int]]]:
    """Runs of tokens that decode to whole characters (a character's UTF-8 bytes may span tokens)."""
    full = decode(tokens)
    replacement = "\ufffd"
    pieces, piece_tokens, current, offset = [], [], [], 0
    for token in tokens:
        current.append(token)
        decoded = decode(current)
        if replacement not in decoded or full[offset + decoded.index(replacement)] == replacement:
            pieces.append(decoded)
            piece_tokens.append(current)
            current = []
            offset += len(decoded)
    return pieces, piece_tokens


def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median along the last axis, edges reflected (as openai-whisper's)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    padded = F.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect")
    return padded.unfold(-1, width, 1).median(dim=-1).values.reshape(shape)


def _dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost` [tokens, frames], start to end: (token, frame) indices."""
    from librosa.sequence import dtw

    _, path = dtw(C=cost, backtrack=True)
    path = path[::-1]
    return path[:, 0], path[:, 1]


def _cap_long_words(timings: list[_Timing]) -> None:
    """openai-whisper's rule: a word longer than twice the median word (at most 1.4 s) at a sentence boundary
    has swallowed a pause; cut it there."""
    durations = np.array([t.end - t.start for t in timings])
    durations = durations[durations.nonzero()]
    if not len(durations):
        return
    median = min(0.7, float(np.median(durations)))
    longest = median * 2
    for previous, timing in zip(timings, timings[1:], strict=False):
        if timing.end - timing.start > longest:
            if timing.text in SENTENCE_ENDS:
                timing.end = timing.start + longest
            elif previous.text in SENTENCE_ENDS:
                timing.start = timing.end - longest
    first = timings[0]
    if first.end - first.start > longest:  # the first word after the window's start, likely after silence
        first.start = max(first.start, first.end - longest)


def _merge_punctuation(timings: list[_Timing]) -> None:
    """Opening punctuation joins the next word, closing punctuation the previous one (which keeps its times)."""
    following = len(timings) - 1
    for index in range(len(timings) - 2, -1, -1):
        previous, after = timings[index], timings[following]
        if previous.text.startswith(" ") and previous.text.strip() in PREPEND_PUNCTUATION:
            after.text = previous.text + after.text
            after.tokens = previous.tokens + after.tokens
            previous.text, previous.tokens = "", []
        else:
            following = index
    kept = 0
    for index in range(1, len(timings)):
        previous, after = timings[kept], timings[index]
        if not previous.text.endswith(" ") and after.text in APPEND_PUNCTUATION:
            previous.text += after.text
            previous.tokens = previous.tokens + after.tokens
            after.text, after.tokens = "", []
        else:
            kept = index


def warm_up() -> None:
    """Compile the DTW (numba) now rather than in the first request that asks for words."""
    _dtw(np.zeros((2, 3)))
