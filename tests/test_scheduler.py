"""The step engine: the same tokens as transformers' `generate`, rows that join and leave mid-decode, fallbacks that
reuse their encoder output, failures that stay with their window.

A tiny random Whisper (with the real tiny.en processor) covers the mechanics in milliseconds; the real tiny.en and
base check that real speech decodes to exactly the reference's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_generation_config
from reference_engine import GenerateReference
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from liteasr.audio import SAMPLE_RATE, load_audio, split_windows
from liteasr.decoding import DecodeOptions, LoopGuard
from liteasr.engine import Engine
from liteasr.errors import InvalidOptionError
from liteasr.modeling import quantize_int8

GREEDY = LoopGuard(enabled=False)


@pytest.fixture(scope="module")
def processor(tiny_en_dir) -> WhisperProcessor:
    return WhisperProcessor.from_pretrained(tiny_en_dir)


def random_engine(config, processor, *, multilingual: bool = False, guard: LoopGuard = GREEDY) -> Engine:
    """A random Whisper with Whisper's generation settings scaled to its vocabulary (`random_generation_config`).
    Its 64 decoder positions cap every window's budget at about 60 tokens, which keeps these tests fast."""
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = random_generation_config(config, multilingual=multilingual)
    return Engine(model, processor, name="random", guard=guard)


def noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32)


def decode_all(engine: Engine, windows, options, **scheduler_options):
    scheduler = engine.scheduler(**scheduler_options)
    ids = [scheduler.add(w, o) for w, o in zip(windows, options, strict=True)]
    done = {}
    for iteration in scheduler.run_until_idle():
        assert not iteration.failed, iteration.failed
        done.update((d.window, d.result) for d in iteration.finished)
    return [done[i] for i in ids]


@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("multilingual", [False, True])
def test_tokens_equal_generate_on_a_random_model(tiny_whisper_config, processor, timestamps, multilingual):
    engine = random_engine(tiny_whisper_config, processor, multilingual=multilingual)
    reference = GenerateReference(engine)
    windows = [noise(seconds, seed) for seed, seconds in enumerate((1.0, 2.5, 4.0))]
    language = "de" if multilingual else None
    options = DecodeOptions(language=language, timestamps=timestamps)
    expected = reference.greedy_tokens(windows, options)
    got = decode_all(engine, windows, [options] * 3, max_rows=3)
    assert [r.tokens for r in got] == expected
    assert all(len(t) > 0 for t in expected)  # a random model says something: the comparison is not vacuous


@pytest.mark.real
@pytest.mark.parametrize("timestamps", [False, True])
def test_tokens_equal_generate_on_tiny_en(tiny_en_dir, clip_path, manifest_rows, timestamps):
    engine = Engine.load(tiny_en_dir, device="cpu", guard=GREEDY)
    ids = ["jfk"] + [r["id"] for r in manifest_rows if r["split"] == "dev"][:3]
    windows = [load_audio(clip_path(i)) for i in ids]
    options = DecodeOptions(timestamps=timestamps)
    expected = GenerateReference(engine).greedy_tokens(windows, options)
    got = decode_all(engine, windows, [options] * len(windows), max_rows=2)  # rows join as others leave
    assert [r.tokens for r in got] == expected


@pytest.mark.real
def test_the_guarded_engine_matches_the_generate_engine_on_base(base_dir, clip_path):
    """The whole window pipeline (language detection, loop guard, silence) against the engine it replaced."""
    engine = Engine.load(base_dir, device="cpu")
    jfk = load_audio(clip_path("jfk"))
    windows = [jfk, jfk, np.zeros(3 * SAMPLE_RATE, dtype=np.float32)]
    options = [DecodeOptions(), DecodeOptions(language="de"), DecodeOptions()]
    expected = GenerateReference(engine).transcribe_windows(windows, options)
    got = engine.transcribe_windows(windows, options)
    assert [(r.language, r.tokens, r.text) for r in got] == [(r.language, r.tokens, r.text) for r in expected]
    assert got[0].language == "en" and got[1].language == "de" and got[2].text == ""


def test_a_model_without_the_tokens_refuses_prompts_and_words(tiny_whisper_config, processor):
    """This model's generation config has no <|startofprev|> and no alignment heads."""
    engine = random_engine(tiny_whisper_config, processor)
    with pytest.raises(InvalidOptionError, match="startofprev"):
        engine.check_options(DecodeOptions(prompt="Kenobi"))
    with pytest.raises(InvalidOptionError, match="alignment heads"):
        engine.check_options(DecodeOptions(words=True))
    with pytest.raises(InvalidOptionError, match="temperature"):
        engine.check_options(DecodeOptions(temperature=1.5))
    engine.check_options(DecodeOptions(prompt="  "))  # an empty prompt is no prompt


@pytest.mark.parametrize("int8", [False, True])
def test_a_row_that_joins_mid_decode_gives_the_tokens_it_gives_alone(tiny_whisper_config, processor, int8):
    engine = random_engine(tiny_whisper_config, processor)
    if int8:  # the CPU default: int8 rows share each quantized call, and must still be rounded alone
        quantize_int8(engine.model)
    first, second = noise(3.0, 1), noise(2.0, 2)
    [alone_first] = decode_all(engine, [first], [DecodeOptions()])
    [alone_second] = decode_all(engine, [second], [DecodeOptions()])
    scheduler = engine.scheduler(max_rows=4)
    a = scheduler.add(first, DecodeOptions())
    for _ in range(5):
        scheduler.run_once()
    assert scheduler.active == 1
    b = scheduler.add(second, DecodeOptions())
    done = {}
    rows_seen = []
    while not scheduler.idle:
        iteration = scheduler.run_once()
        rows_seen.append(iteration.step.size if iteration.step else 0)
        done.update((d.window, d) for d in iteration.finished)
    assert max(rows_seen) == 2  # the two really shared steps
    assert done[a].result.tokens == alone_first.tokens
    assert done[b].result.tokens == alone_second.tokens
    assert done[b].max_rows == 2


def test_cancelling_mid_decode_frees_its_slot(tiny_whisper_config, processor):
    engine = random_engine(tiny_whisper_config, processor)
    kept, dropped = noise(3.0, 3), noise(3.0, 4)
    [alone] = decode_all(engine, [kept], [DecodeOptions()])
    scheduler = engine.scheduler(max_rows=2)
    keep_id = scheduler.add(kept, DecodeOptions(), key="keep")
    scheduler.add(dropped, DecodeOptions(), key="leave")
    scheduler.add(dropped, DecodeOptions(), key="leave")  # still queued: no free slot
    for _ in range(4):
        scheduler.run_once()
    assert (scheduler.active, scheduler.waiting) == (2, 1)
    assert scheduler.cancel("leave") == (1, 1)
    assert (scheduler.active, scheduler.waiting) == (1, 0)
    finished = [d for it in scheduler.run_until_idle() for d in it.finished]
    assert [d.window for d in finished] == [keep_id]
    assert finished[0].result.tokens == alone.tokens


def test_a_short_request_starts_before_a_long_one_has_all_its_windows_admitted(
    tiny_whisper_config, processor
):
    engine = random_engine(tiny_whisper_config, processor)
    scheduler = engine.scheduler(max_rows=2)
    for _ in range(6):
        scheduler.add(noise(1.0, 5), DecodeOptions(), key="long file")
    short = scheduler.add(noise(1.0, 6), DecodeOptions(), key="short")
    admitted = [w for it in scheduler.run_until_idle() for w, _ in it.admitted]
    assert admitted.index(short) == 1  # right after the long file's first window


def test_a_fallback_row_reuses_its_encoder_output(tiny_whisper_config, processor, monkeypatch):
    """A random model loops, so the guard retries at every temperature: one encoder pass all the same."""
    engine = random_engine(tiny_whisper_config, processor, guard=LoopGuard(no_speech_threshold=1.0))
    encoded = []
    original = engine.encode
    monkeypatch.setattr(engine, "encode", lambda windows: encoded.append(len(windows)) or original(windows))
    scheduler = engine.scheduler(max_rows=2)
    window = scheduler.add(noise(2.0, 7), DecodeOptions(), listen=True)
    iterations = scheduler.run_until_idle()
    [done] = [d for it in iterations for d in it.finished]
    attempts = {event.attempt for it in iterations for event in it.tokens if event.window == window}
    assert done.result.looped and attempts == set(range(1 + len(engine.guard.temperatures)))
    assert encoded == [1]


def test_a_fallback_samples_the_same_tokens_whatever_shares_its_steps(tiny_whisper_config, processor):
    engine = random_engine(tiny_whisper_config, processor, guard=LoopGuard(no_speech_threshold=1.0))
    audio = noise(2.0, 8)

    def attempts(companions: list[np.ndarray]) -> dict[int, list[int]]:
        scheduler = engine.scheduler(max_rows=1 + len(companions))
        for other in companions[:1]:
            scheduler.add(other, DecodeOptions())
        scheduler.add(audio, DecodeOptions(), listen=True)  # the only window listened to
        for other in companions[1:]:
            scheduler.add(other, DecodeOptions())
        tokens: dict[int, list[int]] = {}
        for iteration in scheduler.run_until_idle():
            for event in iteration.tokens:
                tokens.setdefault(event.attempt, []).append(event.token)
        assert set(tokens) == set(range(1 + len(engine.guard.temperatures)))  # every temperature was sampled
        return tokens

    assert attempts([]) == attempts([noise(4.0, 9), noise(1.0, 10)])


def test_the_token_stream_reports_every_token_of_listened_windows_only(tiny_whisper_config, processor):
    engine = random_engine(tiny_whisper_config, processor)
    scheduler = engine.scheduler(max_rows=2)
    heard = scheduler.add(noise(2.0, 11), DecodeOptions(), listen=True)
    scheduler.add(noise(2.0, 12), DecodeOptions())
    iterations = scheduler.run_until_idle()
    events = [e for it in iterations for e in it.tokens]
    [result] = [d.result for it in iterations for d in it.finished if d.window == heard]
    assert {e.window for e in events} == {heard}
    assert tuple(e.token for e in events) == result.tokens


def test_a_window_whose_encoder_pass_fails_alone_fails_alone(tiny_whisper_config, processor, monkeypatch):
    engine = random_engine(tiny_whisper_config, processor)
    bad = np.full(SAMPLE_RATE, 0.123, dtype=np.float32)
    original = engine.encode

    def encode(windows):
        if any(np.all(w == np.float32(0.123)) for w in windows):
            raise RuntimeError("this window breaks the encoder")
        return original(windows)

    monkeypatch.setattr(engine, "encode", encode)
    scheduler = engine.scheduler(max_rows=4, encoder_batch=3)
    good = [scheduler.add(noise(1.0, 13), DecodeOptions()), scheduler.add(noise(1.0, 14), DecodeOptions())]
    broken = scheduler.add(bad, DecodeOptions())
    iterations = scheduler.run_until_idle()
    assert [w for it in iterations for w, _ in it.failed] == [broken]
    assert sorted(d.window for it in iterations for d in it.finished) == good
    assert [r for it in iterations for r in it.retries] == ["error"]


def test_an_encoder_out_of_memory_retries_in_halves(tiny_whisper_config, processor, monkeypatch):
    engine = random_engine(tiny_whisper_config, processor)
    original, sizes = engine.encode, []

    def encode(windows):
        sizes.append(len(windows))
        if len(windows) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(windows)

    monkeypatch.setattr(engine, "encode", encode)
    scheduler = engine.scheduler(max_rows=4, encoder_batch=4)
    for seed in range(4):
        scheduler.add(noise(1.0, seed), DecodeOptions())
    iterations = scheduler.run_until_idle()
    assert sizes == [4, 2, 2] and [r for it in iterations for r in it.retries] == ["oom"]
    assert sum(len(it.finished) for it in iterations) == 4 and not any(it.failed for it in iterations)


def test_a_failed_step_is_retried_row_by_row(tiny_whisper_config, processor, monkeypatch):
    """A decode step that breaks on one row fails that row's window only; the others decode as they would."""
    engine = random_engine(tiny_whisper_config, processor)
    windows = [noise(2.0, 15), noise(2.0, 16)]
    alone = decode_all(engine, windows, [DecodeOptions()] * 2)
    scheduler = engine.scheduler(max_rows=2)
    ids = [scheduler.add(w, DecodeOptions()) for w in windows]
    for _ in range(2):
        scheduler.run_once()
    original = scheduler.slots.forward
    poisoned = {"slot": 1}

    def forward(rows, tokens, start, **kwargs):
        covered = range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()
        if poisoned["slot"] in covered:
            raise RuntimeError("this row breaks the decoder")
        return original(rows, tokens, start, **kwargs)

    monkeypatch.setattr(scheduler.slots, "forward", forward)
    iteration = scheduler.run_once()
    assert [w for w, _ in iteration.failed] == [ids[1]] and iteration.retries == ["error"]
    poisoned["slot"] = -1
    finished = [d for it in [iteration, *scheduler.run_until_idle()] for d in it.finished]
    assert [(d.window, d.result.tokens) for d in finished] == [(ids[0], alone[0].tokens)]


@pytest.mark.real
def test_timestamp_rules_hold_on_the_long_split(tiny_en_dir, manifest_rows, clip_path):
    engine = Engine.load(tiny_en_dir, device="cpu")
    begin = engine.timestamp_begin
    rows = [r for r in manifest_rows if r["split"] == "long"]
    windows = [w for r in rows for w in split_windows(load_audio(clip_path(r["id"])))]
    results = engine.transcribe_windows(
        [w.samples for w in windows], [DecodeOptions(timestamps=True)] * len(windows)
    )
    for result in results:
        tokens = result.tokens
        stamps = [t - begin for t in tokens if t >= begin]
        assert tokens and tokens[0] >= begin and stamps[0] <= 50  # starts with a timestamp of at most 1 s
        assert stamps == sorted(stamps)  # monotonic
        assert 0.02 * stamps[-1] <= 30.0
        is_stamp = [t >= begin for t in tokens]
        # Pairs: never three timestamps in a row, and a lone timestamp only where text follows or at the end.
        assert not any(is_stamp[i] and is_stamp[i + 1] and is_stamp[i + 2] for i in range(len(tokens) - 2))
        assert result.segments and all(s.start < s.end for s in result.segments)
