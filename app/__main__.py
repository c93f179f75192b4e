"""`python -m app`: serve with uvicorn, configured from the `LITEASR_` settings.

On SIGTERM or Ctrl-C the service stops admitting at once (503 `shutting_down`), uvicorn waits up to
`LITEASR_SHUTDOWN_GRACE_S` for open requests, the lifespan drains the batcher, and the process exits 0. After a
fatal fault (the batch worker died) it exits 1, for its supervisor to restart it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.main import begin_shutdown, create_app


class _Server(uvicorn.Server):
    """uvicorn, plus: tell the app when a signal arrives, and exit 0 after a graceful stop.

    uvicorn re-raises a captured SIGTERM once it has shut down, which kills the process with status 143; a
    graceful stop is a normal exit for an orchestrator, so the signal is consumed instead.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.exit_code = 0
        app.state.request_exit = self.request_exit

    def request_exit(self, code: int) -> None:
        """Stop serving and exit with `code` (1 after a fatal fault: the supervisor restarts the process)."""
        self.exit_code = code
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        begin_shutdown(self.app)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        lifespan="on",
    )
    server = _Server(config, app)
    server.run()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
