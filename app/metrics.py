"""Every Prometheus object of the service, in one registry per app (so tests can build several apps).

Names follow client_python's conventions: one namespace (`liteasr_`), base units, counters end in `_total`, and
every label value that can be known up front is created up front, so a dashboard sees zeros instead of gaps.
Latency buckets cover 10 ms (a warm short clip on a GPU) to 120 s (a long file queued behind others on a CPU).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "JOB_STATES",
    "LATENCY_BUCKETS",
    "REJECT_REASONS",
    "GpuMemoryCollector",
    "Metrics",
    "MetricsMiddleware",
]

NAMESPACE = "liteasr"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# A decode step takes about a millisecond (small model, GPU) to a few hundred (large model, CPU, many rows).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
# Why a request was refused or abandoned; the label values of liteasr_requests_rejected_total.
REJECT_REASONS = (
    "queue_full",
    "too_large",
    "too_long",
    "bad_audio",
    "bad_option",
    "invalid_request",
    "timeout",
    "client_gone",
    "shutting_down",
    "not_ready",
)
DROP_REASONS = ("client_gone", "timeout", "failed", "shutting_down")
RETRY_REASONS = ("error", "oom")
REALTIME_CLOSE_REASONS = ("binary_frame", "too_big", "flood", "idle", "session_length", "busy", "not_ready")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
ACTIVATION_RESULTS = ("succeeded", "failed")
# A compression job takes seconds (tiny on a GPU) to hours (large-v3 on a CPU).
JOB_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)


class Metrics:
    """The service's metrics; `registry` is what `GET /metrics` renders."""

    def __init__(
        self, max_batch_size: int, max_queue: int = 64, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        common = {"namespace": NAMESPACE, "registry": self.registry}

        self.request_duration = Histogram(
            "request_duration_seconds",
            "Time from receiving an HTTP request to sending its response, by route and status code.",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time a window waited for a decoder slot: from submission to the start of its encoder pass.",
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.decode_step_duration = Histogram(
            "decode_step_duration_seconds",
            "Duration of one decode step (every decoding row advances by one token).",
            buckets=STEP_BUCKETS,
            **common,
        )
        self.decode_step_rows = Histogram(
            "decode_step_rows",
            "Decoder rows (windows) advanced together by one decode step.",
            buckets=_size_buckets(max_batch_size),
            **common,
        )
        self.encoder_pass_duration = Histogram(
            "encoder_pass_duration_seconds",
            "Duration of one encoder pass (with the cross-attention keys and values and the prompt of its "
            "windows).",
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.encoder_pass_windows = Histogram(
            "encoder_pass_windows",
            "Windows encoded together by one encoder pass.",
            buckets=_size_buckets(max_batch_size),
            **common,
        )
        self.model_busy = Counter(
            "model_busy_seconds",
            "Seconds the model spent in scheduler iterations (encoder passes and decode steps); its rate is the "
            "model's utilisation.",
            **common,
        )
        self.audio_seconds = Counter(
            "audio_seconds", "Seconds of audio transcribed (answered requests).", **common
        )
        self.windows = Counter("windows", "Windows decoded to the end by the model.", **common)
        self.vad_skipped_seconds = Counter(
            "vad_skipped_seconds",
            "Seconds of uploaded audio that voice activity detection found no speech in: never decoded.",
            **common,
        )
        self.decoded_tokens = Counter("decoded_tokens", "Tokens in the results of decoded windows.", **common)
        self.queue_depth = Gauge("queue_depth", "Windows waiting for a decoder slot.", **common)
        self.windows_running = Gauge(
            "windows_running", "Windows decoding now (decoder rows in use).", **common
        )
        self.requests_in_flight = Gauge(
            "requests_in_flight",
            "Transcription requests admitted and not yet answered (bounded by LITEASR_MAX_QUEUE).",
            **common,
        )
        self.requests_rejected = Counter(
            "requests_rejected",
            "Transcription requests refused or abandoned, by reason.",
            ["reason"],
            **common,
        )
        self.windows_dropped = Counter(
            "windows_dropped",
            "Queued windows skipped because their request ended first (client left, timeout, a failed sibling, "
            "shutdown).",
            ["reason"],
            **common,
        )
        self.rows_freed = Counter(
            "rows_freed",
            "Decoding rows freed before their window ended because their request ended first, by reason.",
            ["reason"],
            **common,
        )
        self.stream_first_event = Histogram(
            "stream_first_event_seconds",
            "Streamed transcriptions (stream=true): time from admission to the first event (the first text, or "
            "the end for audio without speech).",
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.stream_revisions = Counter(
            "stream_revisions",
            "Streamed windows whose text was decoded again after part of it was sent (a loop-guard fallback): "
            "their final text is in the done event only.",
            **common,
        )
        self.realtime_sessions = Gauge(
            "realtime_sessions", "Live transcription sessions (/v1/realtime WebSockets) open now.", **common
        )
        self.realtime_turns = Counter(
            "realtime_turns",
            "Committed turns of realtime sessions, by result (completed, failed: an error event was sent).",
            ["result"],
            **common,
        )
        self.caption_latency = Histogram(
            "realtime_caption_latency_seconds",
            "Realtime turns: from the end of speech (server VAD) or the commit to the completed transcript.",
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.realtime_closes = Counter(
            "realtime_closes",
            "Realtime sessions closed by the server, by reason (the client's own closes are not counted).",
            ["reason"],
            **common,
        )
        self.batch_retries = Counter(
            "batch_retries",
            "Encoder passes or decode steps that failed and were retried: window by window after an error, in "
            "halves after out-of-memory.",
            ["reason"],
            **common,
        )
        self.window_failures = Counter(
            "window_failures", "Windows that failed on their own, after their pass was retried.", **common
        )
        self.model_info = Info("model", "The served model.", **common)
        self.model_load_seconds = Gauge(
            "model_load_seconds", "Seconds the model took to load and warm up.", **common
        )
        self.ready = Gauge("ready", "1 when the model is loaded and requests are served, else 0.", **common)
        self.max_queue = Gauge(
            "max_queue", "Most transcription requests admitted at once (LITEASR_MAX_QUEUE).", **common
        )
        self.max_queue.set(max_queue)
        self.models_loaded = Gauge(
            "models_loaded",
            "Models in memory: the served one, plus a swapped-out one while requests admitted before the swap "
            "finish.",
            **common,
        )
        self.model_activations = Counter(
            "model_activations", "Hot swaps of the served model (admin API), by result.", ["result"], **common
        )
        self.jobs = Counter(
            "jobs", "Compression jobs that reached each state (admin API).", ["state"], **common
        )
        self.jobs_stored = Gauge(
            "jobs_stored",
            "Compression job records in the job store, by their current state.",
            ["state"],
            **common,
        )
        self.job_duration = Histogram(
            "job_duration_seconds",
            "Run time of finished compression jobs (start to end), by final state.",
            ["state"],
            buckets=JOB_BUCKETS,
            **common,
        )

        for reason in REJECT_REASONS:
            self.requests_rejected.labels(reason)
        for reason in DROP_REASONS:
            self.windows_dropped.labels(reason)
            self.rows_freed.labels(reason)
        for result in ("completed", "failed"):
            self.realtime_turns.labels(result)
        for reason in REALTIME_CLOSE_REASONS:
            self.realtime_closes.labels(reason)
        for reason in RETRY_REASONS:
            self.batch_retries.labels(reason)
        for result in ACTIVATION_RESULTS:
            self.model_activations.labels(result)
        for state in JOB_STATES:
            self.jobs.labels(state)
            self.jobs_stored.labels(state)
        for state in FINAL_JOB_STATES:
            self.job_duration.labels(state)

    def watch_gpu(self, device) -> None:
        """Add the GPU memory gauges (read at scrape time) for a CUDA device."""
        self.registry.register(GpuMemoryCollector(device))


def _size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """One bucket per size up to 16, then powers of two: the histogram shows exactly how full steps are."""
    sizes = list(range(1, min(max_batch_size, 16) + 1))
    size = 32
    while sizes[-1] < max_batch_size:
        sizes.append(min(size, max_batch_size))
        size *= 2
    return tuple(float(s) for s in sizes)


class GpuMemoryCollector(Collector):
    """`liteasr_gpu_memory_{allocated,reserved,total}_bytes` of one CUDA device, read from torch at scrape time."""

    def __init__(self, device) -> None:
        self.device = device

    def collect(self) -> Iterable[GaugeMetricFamily]:
        import torch

        label = str(self.device)
        readings = {
            "allocated": ("Bytes of GPU memory held by tensors.", torch.cuda.memory_allocated(self.device)),
            "reserved": (
                "Bytes of GPU memory reserved by the caching allocator.",
                torch.cuda.memory_reserved(self.device),
            ),
            "max_allocated": (
                "Peak bytes of GPU memory held by tensors since start.",
                torch.cuda.max_memory_allocated(self.device),
            ),
            "total": (
                "Bytes of memory of the GPU.",
                torch.cuda.get_device_properties(self.device).total_memory,
            ),
        }
        for name, (doc, value) in readings.items():
            family = GaugeMetricFamily(f"{NAMESPACE}_gpu_memory_{name}_bytes", doc, labels=["device"])
            family.add_metric([label], float(value))
            yield family


class MetricsMiddleware:
    """Times every HTTP request into `liteasr_request_duration_seconds{endpoint, status}`.

    `endpoint` is the route's path template (never the raw path, which a client controls), or `unmatched`.
    Pure ASGI rather than BaseHTTPMiddleware, so it does not touch the request body or the disconnect signal.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
                metrics.request_duration.labels(endpoint, str(status)).observe(time.perf_counter() - started)
