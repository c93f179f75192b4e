"""`create_app(settings)`: the FastAPI application, its lifespan, middleware, error handlers and routes.

The lifespan creates the long-lived objects on `app.state` (metrics registry, service: engine and batcher; the
compression job runner when the admin API is on) and starts loading the model in the background, so the server
answers `/readyz` with 503 while it loads. On shutdown it stops a running compression job (recorded as failed) and
drains the batcher: admitted requests finish (up to `shutdown_grace_s`), new ones get 503.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.config import Settings
from app.errors import install_error_handlers
from app.jobs import JobRunner
from app.metrics import Metrics, MetricsMiddleware
from app.routers import admin, health, openai, page, realtime, transcribe
from app.service import Service
from liteasr import __version__

__all__ = ["begin_shutdown", "create_app"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.metrics = Metrics(settings.max_batch_size, settings.max_queue)
    app.state.service = service = Service(settings, app.state.metrics)
    service.on_fatal = lambda: _exit_for_restart(app)
    app.state.jobs = jobs = None
    if settings.admin_token is not None:
        app.state.jobs = jobs = JobRunner(settings, app.state.metrics, service.registry, service.activate)
        jobs.start()
    service.start()
    try:
        yield
    finally:
        if jobs is not None:
            await jobs.close()
        await service.stop(settings.shutdown_grace_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="LiteASR Serve",
        version=__version__,
        summary="Transcription with LiteASR-compressed Whisper models; OpenAI-compatible audio API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )
    app.include_router(transcribe.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(page.router)
    app.include_router(realtime.router)
    return app


def _exit_for_restart(app: FastAPI) -> None:
    """End the process after a fatal fault: with exit status 1 under `python -m app` (`app.state.request_exit`),
    else by SIGTERM to ourselves, which any ASGI server turns into a shutdown."""
    request_exit = getattr(app.state, "request_exit", None)
    if request_exit is not None:
        request_exit(1)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def begin_shutdown(app: FastAPI) -> None:
    """Called on SIGTERM, before uvicorn waits for open requests: stop admitting, let admitted ones finish."""
    service: Service | None = getattr(app.state, "service", None)
    if service is not None:
        service.begin_shutdown()
