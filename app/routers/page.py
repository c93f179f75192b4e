"""`GET /`: the page (upload, streamed transcript, words that play, downloads, microphone), from the package.

Plain files, no build step and nothing from a CDN: the service runs offline. The page refers to its assets and
to the API by relative URLs, so it also works behind a proxy that serves the service under a path prefix. Every
response says `Cache-Control: no-cache` (revalidate by ETag), so a new release never runs a cached old script.
The assets go through a route rather than a mount so that `liteasr_request_duration_seconds` labels them
(`endpoint="/static/{path:path}"`; the page is `endpoint="/"`): that histogram counts the page's requests.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["page"], include_in_schema=False)


class _Assets(StaticFiles):
    """StaticFiles (ETag, 304, no path escapes), revalidated on every load."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


_assets = _Assets(directory=STATIC_DIR)


@router.get("/", response_class=FileResponse)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/static/{path:path}")
async def asset(path: str, request: Request) -> Response:
    return await _assets.get_response(path, request.scope)
