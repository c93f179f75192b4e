"""`create_app(settings)`: the FastAPI application, its lifespan, middleware, error handlers and routes.

The lifespan creates the long-lived objects on `app.state` (metrics registry, service: engine and batcher) and
starts loading the model in the background, so the server answers `/readyz` with 503 while it loads. On shutdown
it drains the batcher: admitted requests finish (up to `shutdown_grace_s`), new ones get 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.config import Settings
from app.errors import install_error_handlers
from app.metrics import Metrics, MetricsMiddleware
from app.routers import health, openai, transcribe
from app.service import Service
from liteasr import __version__

__all__ = ["begin_shutdown", "create_app"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.metrics = Metrics(settings.max_batch_size)
    app.state.service = Service(settings, app.state.metrics)
    app.state.service.start()
    try:
        yield
    finally:
        await app.state.service.stop(settings.shutdown_grace_s)


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
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Called on SIGTERM, before uvicorn waits for open requests: stop admitting, let admitted ones finish."""
    service: Service | None = getattr(app.state, "service", None)
    if service is not None:
        service.begin_shutdown()
