"""`TextDeltas`: a request's window tokens -> its transcript, in order, piece by piece (no model: a toy decoder).

The toy vocabulary: token n decodes to the word `WORDS[n]` with its leading space; 99 is the first half of a
two-token character (it decodes to U+FFFD alone), 98 its second half.
"""

from __future__ import annotations

from app.streaming import TextDeltas
from liteasr.decoding import TokenEvent

WORDS = {1: " And", 2: " so", 3: " my", 4: " fellow", 5: " Americans", 6: " the", 7: " end."}


def toy_text(tokens) -> str:
    text, pending = "", False
    for token in tokens:
        if token == 99:
            pending = True
        elif token == 98 and pending:
            text, pending = text + " é", False
        else:
            text += WORDS[token]
    return text + ("\ufffd" if pending else "")


class Stream:
    def __init__(self, windows: int) -> None:
        self.pieces: list[str] = []
        self.deltas = TextDeltas(toy_text, windows, self.pieces.append)
        self._attempts = [0] * windows

    def tokens(self, window: int, *tokens: int, attempt: int = 0) -> None:
        for token in tokens:
            self.deltas.token(window, TokenEvent(window=100 + window, attempt=attempt, token=token))

    def done(self, window: int, *tokens: int) -> None:
        self.deltas.window_done(window, toy_text(tokens).strip())

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def test_one_window_streams_token_by_token_and_ends_as_its_final_text():
    stream = Stream(1)
    stream.tokens(0, 1)
    assert stream.pieces == ["And"]  # the window's text is stripped: no leading space
    stream.tokens(0, 2, 3)
    assert stream.pieces == ["And", " so", " my"]
    stream.done(0, 1, 2, 3)
    assert stream.text == "And so my" and stream.deltas.revised == 0


def test_later_windows_wait_for_earlier_ones_and_join_with_one_space():
    stream = Stream(3)
    stream.tokens(1, 4, 5)  # window 1 decodes first: held
    stream.tokens(2, 6, 7)
    assert stream.pieces == []
    stream.tokens(0, 1, 2)
    assert stream.text == "And so"
    stream.done(1, 4, 5)  # done, but window 0 is not
    assert stream.text == "And so"
    stream.done(0, 1, 2)  # window 0 ends: window 1's whole text follows at once, then window 2's so far
    assert stream.text == "And so fellow Americans the end."
    stream.done(2, 6, 7)
    assert stream.text == "And so fellow Americans the end."


def test_a_silent_window_adds_nothing_and_no_double_space():
    stream = Stream(3)
    stream.tokens(0, 1)
    stream.done(0, 1)
    stream.done(1)  # no text (silence)
    stream.tokens(2, 2)
    stream.done(2, 2)
    assert stream.text == "And so"


def test_a_character_split_over_two_tokens_waits_for_its_second_half():
    stream = Stream(1)
    stream.tokens(0, 1, 99)
    assert stream.text == "And"
    stream.tokens(0, 98)
    assert stream.text == "And é"


def test_a_growing_repetition_is_held_back_until_it_ends():
    stream = Stream(1)
    stream.tokens(0, 1, 6, 6, 6)
    assert stream.text == "And the"  # the repeats may be a loop (a loop cut keeps its first round)
    stream.tokens(0, 7)
    assert stream.text == "And the the the end."  # it was not


def test_a_fallback_stops_the_window_and_counts_a_revision_when_its_text_changes():
    stream = Stream(2)
    stream.tokens(0, 1, 2)
    stream.tokens(0, 3, attempt=1)  # decoded again: what was sent cannot be taken back, nothing more is sent
    assert stream.text == "And so"
    stream.tokens(1, 4)
    stream.done(0, 3, 4)  # the final text does not begin with what was sent
    assert stream.deltas.revised == 1
    assert stream.text == "And so fellow"  # the next window streams on


def test_a_fallback_whose_final_text_extends_the_sent_one_is_no_revision():
    stream = Stream(1)
    stream.tokens(0, 1, 2)
    stream.tokens(0, 1, attempt=1)
    stream.done(0, 1, 2, 3)
    assert stream.text == "And so my" and stream.deltas.revised == 0
