"""Compression jobs of the admin API: a store that survives restarts, a runner that runs one job at a time in a
process of its own, and what that process does.

A job runs in a spawned child process (not forked: the server holds threads and maybe a CUDA context), so
compression never blocks the event loop, and a crash, a kill or a leak takes down only the job. The child
reports progress through a pipe; the runner writes it to SQLite (`DATA_DIR/jobs.sqlite3`). After a restart, a job
that was running is marked failed (its process died with the server) and queued jobs run.

The child runs the library's compression job (`liteasr.pipeline`: import, calibrate, factorize, save, gate), the
same as `liteasr compress`. It builds the model in `MODELS_DIR/.jobs/<id>/` and moves it to `MODELS_DIR/<name>`
only when compression and the gate are done, so a failed or cancelled job leaves no half-written model where it
could be served. A model whose gate failed is moved there too, but never activated by its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import Conflict, InvalidPath, NotFound, ServiceError
from app.metrics import JOB_STATES, Metrics
from app.registry import ModelRegistry, inside, redact
from app.schemas import CompressJobRequest

__all__ = ["JobRecord", "JobRunner", "JobStore", "run_job"]

logger = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled")
WORK_DIR = ".jobs"  # under MODELS_DIR; hidden, so never listed or activated
KILL_AFTER_S = 10.0  # a cancelled job's process gets SIGTERM, then SIGKILL after this long
# Share of a job's progress per stage (sensitivity with a budget, heal with healing, int8 with the int8 probe;
# their share is skipped otherwise); the gate transcribes its clips twice (source and result).
STAGE_SPANS = {
    "import": (0.0, 0.05),
    "calibrate": (0.05, 0.25),
    "sensitivity": (0.25, 0.35),
    "factorize": (0.35, 0.4),
    "heal": (0.4, 0.72),
    "int8": (0.72, 0.75),
    "save": (0.75, 0.8),
    "gate": (0.8, 1.0),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    progress REAL NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    request TEXT NOT NULL,
    report TEXT,
    gate TEXT,
    activated INTEGER NOT NULL DEFAULT 0,
    activation_error TEXT
)
"""
_JSON_COLUMNS = ("request", "report", "gate")


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    state: str
    stage: str
    progress: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    request: dict[str, Any]
    report: dict[str, Any] | None
    gate: dict[str, Any] | None
    activated: bool
    activation_error: str | None


class JobStore:
    """Job records in SQLite. Writes come from the event loop and the runner's reader thread, hence the lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, name: str, request: dict[str, Any]) -> JobRecord:
        job_id = uuid.uuid4().hex[:16]
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, name, state, stage, progress, created_at, request) "
                "VALUES (?, ?, 'queued', 'queued', 0, ?, ?)",
                (job_id, name, time.time(), json.dumps(request)),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id[:64]!r}", code="job_not_found")
        return _record(row)

    def list(self, limit: int = 1000) -> list[JobRecord]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_record(row) for row in rows]

    def update(self, job_id: str, **values: Any) -> None:
        unknown = set(values) - {f.name for f in fields(JobRecord)}
        assert not unknown, unknown
        encoded = {k: json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in values.items()}
        columns = ", ".join(f"{name} = ?" for name in encoded)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*encoded.values(), job_id))

    def next_queued(self) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1"
            ).fetchone()
        return None if row is None else _record(row)

    def pending_names(self) -> set[str]:
        """Names that queued or running jobs will write."""
        with self._lock:
            rows = self._db.execute("SELECT name FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        return {row["name"] for row in rows}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in JOB_STATES} | {row["state"]: row["n"] for row in rows}

    def fail_interrupted(self, message: str) -> list[str]:
        """Mark every running job failed (its process is gone); returns their ids."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()
            self._db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE state = 'running'",
                (message, time.time()),
            )
        return [row["id"] for row in rows]


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    values["activated"] = bool(values["activated"])
    return JobRecord(**values)


# -- the runner (event loop side) ---------------------------------------------------------------------------


@dataclass
class _Running:
    job_id: str
    process: multiprocessing.process.BaseProcess
    stop_reason: str | None = None  # set when the runner ends the job: "cancelled" or "shutdown"


class JobRunner:
    """Queues compression jobs and runs them one at a time, each in a child process.

    `activate(name)` is the service's hot swap, awaited when a job that asked for activation succeeds (and its
    gate passed).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        registry: ModelRegistry,
        activate: Callable[[str], Awaitable[object]],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self._activate = activate
        self.store = JobStore(settings.data_dir / "jobs.sqlite3")
        self._wake = asyncio.Event()
        self._running: _Running | None = None
        self._finished: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        interrupted = self.store.fail_interrupted(
            "the server stopped while this job was running; submit it again"
        )
        if interrupted:
            logger.warning(
                "marked %d interrupted job(s) failed: %s", len(interrupted), ", ".join(interrupted)
            )
        pending = {job.id for job in self.store.list() if job.state == "queued"}
        work = self.registry.root / WORK_DIR
        if work.is_dir():
            for leftover in work.iterdir():
                if leftover.name not in pending:
                    shutil.rmtree(leftover, ignore_errors=True)
        self._refresh_gauges()
        self._task = asyncio.create_task(self._loop(), name="liteasr-jobs")

    async def close(self) -> None:
        """Stop the running job (marked failed: the server shut down) and the runner."""
        if self._running is not None:
            self._stop(self._running, "shutdown")
            finished = self._finished.get(self._running.job_id)
            if finished is not None:
                await asyncio.wait_for(finished.wait(), KILL_AFTER_S + 5)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.store.close()

    # -- API ------------------------------------------------------------------------------------------------

    async def submit(self, request: CompressJobRequest) -> JobRecord:
        """Check what can be checked at once (400/409 now rather than a failed job later), then queue."""
        name = request.name
        if self.registry.exists(name) or name in self.store.pending_names():  # exists() checks the name
            raise Conflict(f"a model or a pending job named {name!r} exists already", code="name_conflict")
        self.registry.source(request.source)
        await asyncio.to_thread(self._check_manifest, request.calibration.manifest, request.calibration.split)
        if request.gate is not None:
            await asyncio.to_thread(self._check_manifest, request.gate.manifest, request.gate.split)
        job = self.store.create(name, request.model_dump())
        self._finished[job.id] = asyncio.Event()
        self.metrics.jobs.labels("queued").inc()
        self._refresh_gauges()
        self._wake.set()
        logger.info("queued compression job %s: %s -> %s", job.id, request.source, name)
        return job

    async def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job.state in FINAL:
            raise Conflict(f"job {job_id} has already ended ({job.state})", code="job_finished")
        running = self._running
        if running is not None and running.job_id == job_id:
            self._stop(running, "cancelled")
            await asyncio.wait_for(self._finished[job_id].wait(), KILL_AFTER_S + 5)
        elif job.state == "running":  # its process is done; it is activating its model
            raise Conflict(
                f"job {job_id} is activating its model and can no longer be cancelled", code="job_finished"
            )
        else:
            self._finish(job_id, "cancelled", stage="cancelled", error="cancelled before it started")
        return self.store.get(job_id)

    # -- the loop -------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            job = self.store.next_queued()
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug here must not stop the queue
                logger.exception("job %s failed in the runner", job.id)
                self._finish(job.id, "failed", error=f"internal error: {type(error).__name__}")

    async def _run(self, job: JobRecord) -> None:
        self._finished.setdefault(job.id, asyncio.Event())
        try:
            spec = self._spec(job)
        except ServiceError as error:  # the source or a manifest changed since submission
            self._finish(job.id, "failed", error=error.message)
            return
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=run_job, args=(spec, sender), name=f"liteasr-job-{job.id}", daemon=True
        )
        process.start()
        sender.close()  # the child holds the only writing end: its exit ends our reads
        self.store.update(job.id, state="running", stage="starting", started_at=time.time())
        self.metrics.jobs.labels("running").inc()
        self._refresh_gauges()
        running = self._running = _Running(job.id, process)
        logger.info("job %s started (pid %d)", job.id, process.pid)
        try:
            outcome = await asyncio.to_thread(self._follow, job.id, receiver, process)
        finally:
            receiver.close()
            self._running = None
        if running.stop_reason == "cancelled":
            self._finish(job.id, "cancelled", stage="cancelled", error="cancelled while running")
        elif running.stop_reason == "shutdown":
            self._finish(job.id, "failed", error="the server shut down while this job was running")
        elif outcome.get("done"):
            if job.request.get(
                "activate"
            ):  # before `succeeded`: a finished job says whether it was activated
                await self._activate_result(job)
            self._finish(job.id, "succeeded", stage="done", progress=1.0)
        else:
            error = outcome.get("error") or f"the job process died (exit code {process.exitcode})"
            self._finish(job.id, "failed", error=error)
        shutil.rmtree(Path(spec["work_dir"]), ignore_errors=True)

    def _follow(self, job_id: str, receiver, process) -> dict[str, Any]:
        """Worker thread: apply the child's messages to the store until it exits."""
        outcome: dict[str, Any] = {}
        while True:
            try:
                kind, data = receiver.recv()
            except (EOFError, OSError):
                break
            if kind == "progress":
                self.store.update(job_id, stage=data["stage"], progress=round(data["progress"], 4))
            elif kind == "report":
                self.store.update(job_id, report=data["report"])
            elif kind == "gate":
                self.store.update(job_id, gate=data["gate"])
            elif kind in ("done", "error"):
                outcome[kind] = data.get("message", True)
        process.join()
        return outcome

    async def _activate_result(self, job: JobRecord) -> None:
        gate = self.store.get(job.id).gate
        if gate is not None and not gate["passed"]:
            self.store.update(
                job.id,
                activation_error=(
                    f"not activated: the gate failed (corpus WER +{gate['increase']:.2f} points, budget "
                    f"{gate['max_wer_increase']:g})"
                ),
            )
            return
        self.store.update(job.id, stage="activate")
        try:
            await self._activate(job.name)
        except ServiceError as error:
            self.store.update(job.id, activation_error=error.message)
            return
        self.store.update(job.id, activated=True)

    def _stop(self, running: _Running, reason: str) -> None:
        """SIGTERM the job's process, SIGKILL it if it lingers; `_run` then records the outcome."""
        running.stop_reason = reason
        running.process.terminate()

        def kill_if_alive() -> None:
            running.process.join(KILL_AFTER_S)
            if running.process.is_alive():
                running.process.kill()

        threading.Thread(target=kill_if_alive, daemon=True).start()

    def _finish(self, job_id: str, state: str, **values: Any) -> None:
        now = time.time()
        self.store.update(job_id, state=state, finished_at=now, **values)
        job = self.store.get(job_id)
        if job.started_at is not None:
            self.metrics.job_duration.labels(state).observe(now - job.started_at)
        self.metrics.jobs.labels(state).inc()
        self._refresh_gauges()
        if state in ("failed", "cancelled"):
            logger.warning("job %s %s: %s", job_id, state, job.error)
        else:
            logger.info("job %s %s", job_id, state)
        finished = self._finished.pop(job_id, None)
        if finished is not None:
            finished.set()

    def _refresh_gauges(self) -> None:
        for state, count in self.store.counts().items():
            self.metrics.jobs_stored.labels(state).set(count)

    # -- paths ----------------------------------------------------------------------------------------------

    def _manifest(self, relative: str, what: str) -> Path:
        path = inside(self.settings.data_dir, relative, what)
        if not path.is_file():
            raise InvalidPath(f"{what} {relative[:200]!r} is not a file in the data folder")
        return path

    def _check_manifest(self, relative: str, split: str) -> None:
        from liteasr.errors import ManifestError
        from liteasr.manifest import read_manifest

        path = self._manifest(relative, "manifest")
        try:
            clips = read_manifest(path, split=split)
        except ManifestError as error:
            raise InvalidPath(self.registry.redact(str(error), self.settings.data_dir)) from None
        if not clips:
            raise InvalidPath(f"manifest {relative!r} has no clips in split {split!r}")
        data = self.settings.data_dir.resolve()
        if outside := [clip.id for clip in clips if not clip.audio.is_relative_to(data)]:
            raise InvalidPath(f"manifest {relative!r} names audio outside the data folder: {outside[:5]}")

    def _spec(self, job: JobRecord) -> dict[str, Any]:
        """What the child process needs, as plain data (it is pickled)."""
        request = CompressJobRequest.model_validate(job.request)
        s = self.settings
        gate = request.gate
        return {
            "job_id": job.id,
            "source": self.registry.source(request.source),
            "calibration": str(self._manifest(request.calibration.manifest, "calibration manifest")),
            "split": request.calibration.split,
            "options": request.compress_options(),
            "gate": None
            if gate is None
            else {
                "manifest": str(self._manifest(gate.manifest, "gate manifest")),
                "split": gate.split,
                "max_clips": gate.max_clips,
                "max_wer_increase": gate.max_wer_increase,
            },
            "data_dir": str(s.data_dir.resolve()),
            "models_dir": str(s.models_dir.resolve()),
            "work_dir": str(s.models_dir.resolve() / WORK_DIR / job.id),
            "name": job.name,
            "cache_dir": str(s.cache_dir.resolve()),
            "device": s.job_device,
            "threads": s.job_threads,
        }


# -- the job process ----------------------------------------------------------------------------------------


def run_job(spec: dict[str, Any], sender) -> None:
    """Entry point of the child process: compress, gate, move into place; report through `sender`."""
    _exit_with_parent()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s job {spec['job_id']} %(levelname)s: %(message)s"
    )
    try:
        _compress_job(spec, lambda kind, **data: sender.send((kind, data)))
    except Exception as error:
        logging.getLogger("liteasr.job").exception("the job failed")
        roots = (spec["work_dir"], spec["models_dir"], spec["data_dir"], spec["cache_dir"])
        message = redact(str(error) or type(error).__name__, roots)
        sender.send(("error", {"message": message[:2000]}))
        sender.close()
        raise SystemExit(1) from None
    sender.send(("done", {}))
    sender.close()


def _exit_with_parent() -> None:
    """Die with the server: a spawned child is not killed when its parent is, so watch for re-parenting."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _compress_job(spec: dict[str, Any], send: Callable[..., None]) -> None:
    """The library's compression job from `spec`, then the result moved into the models folder."""
    import torch

    from liteasr.compress import CompressOptions
    from liteasr.engine import resolve_device
    from liteasr.errors import CompressionError
    from liteasr.pipeline import CompressJob, GateSpec, run_compress_job

    torch.set_num_threads(spec["threads"])
    gate = spec["gate"]
    built = Path(spec["work_dir"]) / spec["name"]
    job = CompressJob(
        source=spec["source"],
        out_dir=built,
        calibration=Path(spec["calibration"]),
        calibration_split=spec["split"],
        options=CompressOptions(**spec["options"], device=str(resolve_device(spec["device"])[0])),
        gate=None
        if gate is None
        else GateSpec(
            manifest=Path(gate["manifest"]),
            split=gate["split"],
            max_clips=gate["max_clips"],
            max_wer_increase=gate["max_wer_increase"],
        ),
        cache_dir=Path(spec["cache_dir"]),
    )
    # Without a gate, compression fills the bar.
    scale = 1.0 if gate is not None else 1 / STAGE_SPANS["save"][1]
    spans = {stage: (low * scale, high * scale) for stage, (low, high) in STAGE_SPANS.items()}

    def progress(stage: str, fraction: float) -> None:
        low, high = spans[stage]
        send("progress", stage=stage, progress=low + (high - low) * min(max(fraction, 0.0), 1.0))

    result = run_compress_job(job, progress, on_report=lambda report: send("report", report=report.to_dict()))
    if result.gate is not None:
        send("gate", gate=asdict(result.gate))

    target = Path(spec["models_dir"]) / spec["name"]
    if target.exists():
        raise CompressionError(f"{spec['name']} appeared in the models folder while the job ran")
    built.rename(target)
