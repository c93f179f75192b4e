"""LiteASR Serve: the HTTP service around the `liteasr` engine. `create_app(settings)` builds it."""

from app.main import create_app

__all__ = ["create_app"]
