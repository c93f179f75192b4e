"""`GET /v1/realtime?intent=transcription`: live transcription over OpenAI's Realtime protocol (`app.realtime`)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from app.realtime import RealtimeSession
from app.service import Service

router = APIRouter(tags=["realtime"])


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, intent: str = "transcription", partials: bool = False) -> None:
    """`partials=true`: also captions of a turn while it is spoken (the `...transcription.partial` extension)."""
    service: Service = websocket.app.state.service
    metrics, settings = service.metrics, service.settings
    if intent != "transcription":
        await websocket.close(1008, "only intent=transcription is served")
        return
    if service.status != "ready":
        metrics.realtime_closes.labels("not_ready").inc()
        await websocket.close(1013, f"the service is {service.status}; try again later")
        return
    if service.realtime_sessions >= settings.realtime_max_sessions:
        metrics.realtime_closes.labels("busy").inc()
        await websocket.close(
            1013, "too many realtime sessions (LITEASR_REALTIME_MAX_SESSIONS); try again later"
        )
        return
    await RealtimeSession(websocket, service, partials=partials).run()
