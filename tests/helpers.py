"""Helpers shared by the test modules: the real server's metrics and error shape, and WAV files written by hand."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

JFK = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
# What no response may contain: stack traces, source files, server paths, object reprs.
LEAKS = ("Traceback", 'File "', ".py", "/work/", "/tmp/", "site-packages", "BytesIO", "0x")


def words(text: str) -> str:
    """Lowercase words only: casing and punctuation ignored."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_error_shape(response: httpx.Response, status: int | None = None, code: str | None = None) -> dict:
    """The service's one error shape, with a message and nothing internal in it; `status` None: any 4xx."""
    if status is not None:
        assert response.status_code == status, response.text
    else:
        assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code"}, body
    assert all(isinstance(v, str) and v for v in body["error"].values()), body
    if code is not None:
        assert body["error"]["code"] == code, body
    for leak in LEAKS:
        assert leak not in response.text, response.text
    return body["error"]


def handmade_wav(
    data: bytes = b"\x00\x01" * 800,
    *,
    channels: int = 1,
    rate: int = 16000,
    bits: int = 16,
    tag: int = 1,
    riff_size: int | None = None,
    data_size: int | None = None,
) -> bytes:
    """A WAV written field by field, so that its header can say what the data does not back."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) % 2**32, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensors alive now, parameters left out: what a stage keeps beyond the model."""
    import gc

    import torch

    # type(), not isinstance(): the heap may hold weak proxies whose referent is gone, and isinstance() on one
    # raises ReferenceError.
    return sum(
        obj.untyped_storage().nbytes()
        for obj in gc.get_objects()
        if issubclass(type(obj), torch.Tensor)
        and not issubclass(type(obj), torch.nn.Parameter)
        and obj.device.type == "cpu"
    )


def random_generation_config(config, *, multilingual: bool = False):
    """Whisper's generation settings scaled to the tiny random model's 128-token vocabulary: 2 end, 3 start,
    100 <|notimestamps|>, 101-127 timestamps (and, multilingual, 90/91 English/German, 92/93 transcribe/translate)."""
    from transformers import GenerationConfig

    settings = {
        "decoder_start_token_id": 3,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "bos_token_id": 2,
        "no_timestamps_token_id": 100,
        "begin_suppress_tokens": [4, 2],
        "suppress_tokens": [5, 6],
        "max_initial_timestamp_index": 5,
        "max_length": config.max_target_positions,
        "is_multilingual": multilingual,
    }
    if multilingual:
        settings |= {
            "lang_to_id": {"<|en|>": 90, "<|de|>": 91},
            "task_to_id": {"transcribe": 92, "translate": 93},
        }
    return GenerationConfig(**settings)


WINDOW_FRAMES = 150  # encoder frames of the compression tests' 3 s window (conftest's `whisper`)


def noise_clips(count: int, seconds: float = 1.5, seed: int = 0):
    """Seeded noise clips (16 kHz float32) for calibration on the tiny random model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(count)]
