"""Tiny accessors for the long-lived objects on `app.state`, as `Annotated` dependencies for route signatures,
and the admin API's bearer-token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.errors import AdminDisabled, Forbidden, Unauthorized
from app.jobs import JobRunner
from app.metrics import Metrics
from app.service import Service

__all__ = ["JobsDep", "MetricsDep", "ServiceDep", "SettingsDep", "require_admin"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_jobs(request: Request) -> JobRunner:
    return request.app.state.jobs


def require_admin(request: Request) -> None:
    """`Authorization: Bearer <LITEASR_ADMIN_TOKEN>`: 401 without a usable one, 403 when it is wrong.

    The comparison takes the same time wherever the tokens differ (`hmac.compare_digest`), so response times do not
    leak the token. With no token configured the admin API does not exist (404).
    """
    token = request.app.state.settings.admin_token
    if token is None:
        raise AdminDisabled("the admin API is off; set LITEASR_ADMIN_TOKEN to turn it on")
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthorized("this needs an `Authorization: Bearer <token>` header")
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise Unauthorized("the Authorization header must read `Bearer <token>`")
    if not hmac.compare_digest(credentials.encode(), token.get_secret_value().encode()):
        raise Forbidden("the admin token is wrong")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
