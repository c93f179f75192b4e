"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import MetricsDep, ServiceDep
from app.errors import error_response
from app.schemas import ErrorResponse

router = APIRouter(tags=["operations"])

_UNAVAILABLE = {503: {"model": ErrorResponse, "description": "Not live / not ready."}}


@router.get("/healthz", summary="Liveness", responses=_UNAVAILABLE)
async def healthz(service: ServiceDep) -> Response:
    """200 while the process can serve (also while loading); 503 if the model failed to load or the batch
    worker died (the process then exits by itself), so an orchestrator restarts it."""
    live, message = service.liveness()
    if not live:
        return error_response(503, message, "unavailable_error", "not_live")
    return JSONResponse({"status": "ok", "model_status": service.status})


@router.get("/readyz", summary="Readiness", responses=_UNAVAILABLE)
async def readyz(service: ServiceDep) -> Response:
    """200 once the model is loaded and warmed; 503 before, after a failed load, and while shutting down."""
    if service.status != "ready":
        messages = {"loading": "the model is still loading", "stopping": "the server is shutting down"}
        message = service.failure if service.status == "failed" else messages[service.status]
        return error_response(503, message or "not ready", "unavailable_error", "not_ready")
    return JSONResponse({"status": "ready", "model": service.model_name})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
