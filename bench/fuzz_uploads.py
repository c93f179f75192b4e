"""Long fuzzing runs of the upload path (not a test: minutes to hours; `tests/test_fuzz.py` is the short run).

Two parts, both with hypothesis and fresh random seeds every round:

- `decode`: the properties of `tests/test_fuzz.py` (arbitrary bytes, mutated valid files, synthesized WAV headers)
  against `liteasr.audio.decode_audio`, in rounds of `--round-examples` examples each, until `--minutes` pass.
  Output must be finite float32 mono within [-1, 1] and the duration limit, or the error an `AudioError`; an
  exception printed from a libsndfile callback (on stderr) also counts as a finding.
- `http`: the real server (`python -m app`, Whisper tiny.en, small limits) on loopback, sent fuzzed multipart
  bodies (random boundaries, part headers, field values, truncation, chunked or with Content-Length, on the three
  transcription routes) whose file parts are the same fuzzed audio. Every answer must be < 500, every error in the
  service's shape without stack traces or paths; at the end the server must be live and its log free of tracebacks.

Each finding is written (the shrunk input as a .bin, and the error) under `--out`, with a JSON summary.

    .venv/bin/python bench/fuzz_uploads.py --minutes 5 --http-minutes 3 [--model models/whisper-tiny.en]
                                           [--round-examples 2000] [--out out/fuzz]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server import serve  # noqa: E402
from test_fuzz import (  # noqa: E402
    arbitrary_bytes,
    check_decode,
    max_seconds_values,
    mutated_files,
    synthesized_wavs,
)

LEAKS = ("Traceback", 'File "', ".py", "/work/", "site-packages")
STDERR_FINDINGS = ("Traceback", "callback")


def round_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


class Findings:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.items: list[dict] = []

    def add(self, kind: str, data: bytes | None, error: str, **extra) -> None:
        index = len(self.items)
        entry = {"kind": kind, "error": error[-3000:], **extra}
        if data is not None:
            path = self.out / f"finding-{index:03d}-{kind}.bin"
            path.write_bytes(data)
            entry["input"] = str(path)
            entry["input_bytes"] = len(data)
        self.items.append(entry)
        print(
            f"FINDING {index} ({kind}): {error.strip().splitlines()[-1] if error.strip() else '?'}",
            flush=True,
        )


class StderrCapture:
    """Redirects fd 2 into a temporary file for a round, to see what C libraries and cffi callbacks print."""

    def __enter__(self) -> StderrCapture:
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()


# -- decode ---------------------------------------------------------------------------------------------------


def fuzz_decode(minutes: float, round_examples: int, findings: Findings) -> dict:
    strategies = {
        "arbitrary": arbitrary_bytes(),
        "mutated": mutated_files(),
        "synthesized": synthesized_wavs(),
    }
    outcomes: Counter[str] = Counter()
    stderr_lines: Counter[str] = Counter()
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < minutes * 60:
        for name, strategy in strategies.items():
            failing: list[tuple[bytes, float | None, str]] = []

            @round_settings(round_examples)
            @given(data=strategy, max_seconds=max_seconds_values)
            def run(data, max_seconds):
                try:
                    outcomes[f"{name}:{check_decode(data, max_seconds)}"] += 1  # noqa: B023
                except BaseException:
                    # the last one is the shrunk example
                    failing.append((data, max_seconds, traceback.format_exc(limit=-4)))  # noqa: B023
                    raise

            with StderrCapture() as captured:
                try:
                    run()
                except Exception:
                    data, max_seconds, error = failing[-1]
                    findings.add(f"decode-{name}", data, error, max_seconds=max_seconds)
            for line in captured.text.splitlines():
                if any(marker in line for marker in STDERR_FINDINGS):
                    findings.add(f"decode-{name}-stderr", None, captured.text)
                    break
                if line.strip():
                    stderr_lines[line.strip()[:120]] += 1
        rounds += 1
        elapsed = time.monotonic() - started
        print(f"decode: round {rounds}, {sum(outcomes.values())} examples, {elapsed:.0f} s", flush=True)
    return {
        "rounds": rounds,
        "examples": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "seconds": round(time.monotonic() - started, 1),
        "stderr_lines_seen": dict(stderr_lines.most_common(20)),
    }


# -- http -----------------------------------------------------------------------------------------------------

ROUTES = ["/transcribe", "/v1/audio/transcriptions", "/v1/audio/translations"]
FIELD_NAMES = [
    "file",
    "language",
    "task",
    "response_format",
    "timestamps",
    "model",
    "temperature",
    "timestamp_granularities[]",
    "stream",
    "prompt",
    "",
    "fi\x00le",
    "x" * 300,
]
FIELD_VALUES = [
    "en",
    "de",
    "xx",
    "",
    "json",
    "text",
    "srt",
    "vtt",
    "verbose_json",
    "xml",
    "true",
    "false",
    "maybe",
    "translate",
    "transcribe",
    "word",
    "segment",
    "0.5",
    "-1",
    "nan",
    "1e309",
    "\x00",
    "é" * 50,
]


@st.composite
def part_headers(draw, name: str, is_file: bool) -> bytes:
    disposition = draw(
        st.sampled_from(
            [
                f'form-data; name="{name}"; filename="a.wav"',
                f'form-data; name="{name}"',
                f"form-data; name={name}",
                "form-data",
                f'attachment; name="{name}"',
                f"form-data; name=\"{name}\"; filename*=UTF-8''%E2%82%AC.wav",
                f'form-data; name="{name}"; filename="' + "x" * 5000 + '"',
            ]
        )
        if is_file
        else st.sampled_from([f'form-data; name="{name}"', f"form-data; name={name}", "form-data; name=", ""])
    )
    headers = []
    if draw(st.integers(0, 7)):
        headers.append(b"Content-Disposition: " + disposition.encode("utf-8", "surrogateescape"))
    if is_file and draw(st.booleans()):
        headers.append(
            b"Content-Type: " + draw(st.sampled_from([b"audio/wav", b"text/plain", b"", b"\xff\xfe"]))
        )
    if draw(st.integers(0, 9)) == 0:  # odd or oversized extra headers
        headers.append(
            draw(st.sampled_from([b"X-A: " + b"a" * 20000, b"NoColonHere", b": empty name", b"\x00\x01"]))
        )
    return b"\r\n".join(headers)


def _mostly(draw, sane, odd):
    """The sane value three times in four, so that most requests get as far as decoding and the model."""
    return draw(sane if draw(st.integers(0, 3)) else odd)


@st.composite
def multipart_requests(draw) -> dict:
    boundary = draw(
        st.sampled_from(
            ["fuzz-boundary", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "x", "b" * 70, "a b", '"q"']
        )
    ).encode()
    names = ["file"] if draw(st.integers(0, 3)) else []  # the audio part, most of the time
    names += draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=4))
    parts = []
    for name in draw(st.permutations(names)):
        is_file = name == "file" or draw(st.integers(0, 9)) == 0
        if is_file:
            body = draw(
                st.one_of(mutated_files(), synthesized_wavs(), arbitrary_bytes())
                | st.integers(0, 2**16).map(lambda extra: b"RIFF" + b"\0" * (2**20 + extra))  # over 1 MiB
            )
            headers = _mostly(
                draw,
                st.just(f'Content-Disposition: form-data; name="{name}"; filename="a.wav"'.encode()),
                part_headers(name, True),
            )
        else:
            body = draw(st.sampled_from(FIELD_VALUES) | st.text(max_size=40)).encode("utf-8", "surrogatepass")
            headers = _mostly(
                draw,
                st.just(f'Content-Disposition: form-data; name="{name}"'.encode("utf-8", "surrogateescape")),
                part_headers(name, False),
            )
        parts.append(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + body + b"\r\n")
    body = b"".join(parts)
    if draw(st.integers(0, 5)):
        body += b"--" + boundary + b"--\r\n"
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    if body and draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    content_type = _mostly(
        draw,
        st.sampled_from(
            [
                b"multipart/form-data; boundary=" + boundary,
                b'multipart/form-data; boundary="' + boundary + b'"',
            ]
        ),
        st.sampled_from(
            [
                b"multipart/form-data; boundary=other",
                b"multipart/form-data",
                b"multipart/form-data; boundary=",
                b"multipart/mixed; boundary=" + boundary,
                b"application/json",
                b"application/x-www-form-urlencoded",
                b"text/plain",
                b"",
            ]
        ),
    )
    return {
        "route": draw(st.sampled_from(ROUTES)),
        "content_type": content_type,
        "body": body,
        "chunked": draw(st.booleans()),
    }


def check_http(client: httpx.Client, request: dict) -> int:
    headers = {"content-type": request["content_type"].decode("latin-1")} if request["content_type"] else {}
    body = request["body"]
    content = iter([body[i : i + 8192] for i in range(0, len(body), 8192)]) if request["chunked"] else body
    response = client.post(request["route"], content=content, headers=headers)
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"}, response.text
        assert all(isinstance(v, str) and v for v in error.values()), response.text
        for leak in LEAKS:
            assert leak not in response.text, response.text
    return status


def fuzz_http(minutes: float, model: Path, round_examples: int, findings: Findings, out: Path) -> dict:
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    settings_ = {
        "LITEASR_MODEL": str(model),
        "LITEASR_CACHE_DIR": str(out / "cache"),
        "LITEASR_MAX_UPLOAD_MB": "1",
        "LITEASR_MAX_AUDIO_SECONDS": "5",
        "LITEASR_LOG_LEVEL": "warning",
    }
    rounds = 0
    with (
        serve(settings_, out / "http-server.log") as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        loop_started = time.monotonic()
        while time.monotonic() - loop_started < minutes * 60:
            failing: list[tuple[dict, str]] = []

            @round_settings(round_examples)
            @given(request=multipart_requests())
            def run(request):
                try:
                    statuses[str(check_http(client, request))] += 1
                except BaseException:
                    failing.append((request, traceback.format_exc(limit=-4)))  # noqa: B023
                    raise

            try:
                run()
            except Exception:
                request, error = failing[-1]
                findings.add(
                    "http",
                    request["body"],
                    error,
                    route=request["route"],
                    content_type=request["content_type"].decode("latin-1"),
                    chunked=request["chunked"],
                )
            rounds += 1
            print(
                f"http: round {rounds}, {sum(statuses.values())} requests, "
                f"{time.monotonic() - started:.0f} s, {dict(statuses)}",
                flush=True,
            )
        live = client.get("/healthz").status_code
        log = server.log(10**7)
    if live != 200:
        findings.add("http-liveness", None, f"/healthz answered {live} after the run")
    if "Traceback" in log:
        findings.add("http-log", None, log[log.index("Traceback") - 2000 :][:6000])
    return {
        "rounds": rounds,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "seconds": round(time.monotonic() - started, 1),
        "healthz_after": live,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="decode fuzzing time (0: skip)")
    parser.add_argument("--http-minutes", type=float, default=0.0, help="HTTP fuzzing time (0: skip)")
    parser.add_argument("--round-examples", type=int, default=2000, help="examples per property per round")
    parser.add_argument("--http-round-examples", type=int, default=300, help="requests per HTTP round")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "whisper-tiny.en")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "fuzz")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    faulthandler.enable()
    findings = Findings(args.out)
    summary: dict = {"command": " ".join(sys.argv), "cpus": os.cpu_count()}
    if args.minutes > 0:
        summary["decode"] = fuzz_decode(args.minutes, args.round_examples, findings)
    if args.http_minutes > 0:
        summary["http"] = fuzz_http(
            args.http_minutes, args.model, args.http_round_examples, findings, args.out
        )
    summary["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary["findings"] = findings.items
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}, indent=2))
    print(f"{len(findings.items)} findings; details in {args.out / 'summary.json'}")
    sys.exit(1 if findings.items else 0)


if __name__ == "__main__":
    main()
