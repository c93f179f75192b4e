"""Run the real service (`python -m app`) on a free loopback port in a subprocess, for tests over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL if it does not come)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@contextmanager
def serve(
    settings: dict[str, str], log_path: Path, *, ready_timeout: float = 240.0
) -> Iterator[RunningServer]:
    """Start the server with these `LITEASR_` settings and yield it once `/readyz` answers 200."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LITEASR_")}
    env.update({"LITEASR_HOST": "127.0.0.1", "LITEASR_PORT": str(port), "LITEASR_LOG_LEVEL": "info"})
    # Never the repository's own models/ and data/: a test sees only what it puts there.
    env.update(
        {"LITEASR_MODELS_DIR": str(log_path.parent / "models"), "LITEASR_DATA_DIR": str(log_path.parent)}
    )
    env.update(settings)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        if process.poll() is None:
            server.terminate()


def _wait_ready(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
                if client.get("/healthz").status_code != 200:
                    raise RuntimeError(f"the server is not live (model load failed?):\n{server.log()}")
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{server.log()}")


@contextmanager
def serve_model(model_dir: Path, work: Path, **settings: str) -> Iterator[RunningServer]:
    """`serve` the model in `model_dir`, its import cache and its log in `work`, with these `LITEASR_` settings."""
    base = {"LITEASR_MODEL": str(model_dir), "LITEASR_CACHE_DIR": str(work / "cache")}
    with serve({**base, **settings}, work / "server.log") as running:
        yield running
