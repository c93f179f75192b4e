"""Every error the service answers with, mapped to HTTP in one place, in one shape.

    {"error": {"message": "...", "type": "...", "code": "..."}}

`type` is the broad class (OpenAI's convention: `invalid_request_error`, `server_error`, ...), `code` the exact
cause a client can branch on. The library's domain errors (`liteasr.errors`) know nothing of HTTP: `DOMAIN_ERRORS`
below is the only place that gives them a status. Nothing internal (stack traces, paths) reaches a response.

Undecodable audio is 415 (`unsupported_audio`): the upload is not media we can read. A decoding option the model
cannot honour (translate on an English-only model, an unknown language) is 400 (`invalid_option`); a field that
fails its schema (an unknown `response_format`) is FastAPI's 422 (`validation_error`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from liteasr.errors import (
    AudioDecodeError,
    AudioTooLongError,
    CheckpointError,
    InvalidOptionError,
    LiteASRError,
)

__all__ = [
    "ActivationFailed",
    "AdminDisabled",
    "ClientGone",
    "Conflict",
    "Forbidden",
    "InvalidPath",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "QueueFull",
    "RequestTimedOut",
    "ServiceError",
    "ShuttingDown",
    "TranscriptionFailed",
    "Unauthorized",
    "UnsupportedParameter",
    "UploadInvalid",
    "UploadTooLarge",
    "error_body",
    "error_event",
    "install_error_handlers",
]

logger = logging.getLogger(__name__)

INVALID = "invalid_request_error"


class ServiceError(Exception):
    """An error the service raises on purpose; the class attributes say how it is answered."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    reason: str | None = None  # label of liteasr_requests_rejected_total, when it counts as a rejection

    def __init__(self, message: str, *, retry_after: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if code is not None:  # a finer cause than the class's own
            self.code = code


class QueueFull(ServiceError):
    status, type, code, reason = 503, "overloaded_error", "queue_full", "queue_full"


class ShuttingDown(ServiceError):
    status, type, code, reason = 503, "unavailable_error", "shutting_down", "shutting_down"


class NotReady(ServiceError):
    status, type, code, reason = 503, "unavailable_error", "not_ready", "not_ready"


class UploadTooLarge(ServiceError):
    status, type, code, reason = 413, INVALID, "upload_too_large", "too_large"


class UploadInvalid(ServiceError):
    """The body is not a usable multipart form (no `file` part, wrong content type, malformed)."""

    status, type, code, reason = 400, INVALID, "invalid_upload", "invalid_request"

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_upload") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class UnsupportedParameter(ServiceError):
    status, type, code, reason = 400, INVALID, "unsupported_parameter", "bad_option"


class RequestTimedOut(ServiceError):
    status, type, code, reason = 504, "timeout_error", "timeout", "timeout"


class ClientGone(ServiceError):
    """The client closed the connection; nobody reads the answer (499, as nginx logs it)."""

    status, type, code, reason = 499, INVALID, "client_closed_request", "client_gone"


class ModelNotFound(ServiceError):
    status, type, code = 404, INVALID, "model_not_found"


class TranscriptionFailed(ServiceError):
    status, type, code = 500, "server_error", "transcription_failed"


class AdminDisabled(ServiceError):
    status, type, code = 404, INVALID, "admin_disabled"


class Unauthorized(ServiceError):
    """No usable bearer token; answered with `WWW-Authenticate: Bearer`."""

    status, type, code = 401, "authentication_error", "unauthorized"


class Forbidden(ServiceError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(ServiceError):
    """A job or a model that does not exist; `code` says which."""

    status, type, code = 404, INVALID, "not_found"


class InvalidPath(ServiceError):
    """A path or name that would leave its root folder, or is not a valid name."""

    status, type, code = 400, INVALID, "invalid_path"


class Conflict(ServiceError):
    """A name that exists, a job that already ended, an activation under way; `code` says which."""

    status, type, code = 409, INVALID, "conflict"


class ActivationFailed(ServiceError):
    """The model to activate could not be loaded; the previous one keeps serving."""

    status, type, code = 422, INVALID, "model_load_failed"


@dataclass(frozen=True)
class _Mapping:
    status: int
    type: str
    code: str
    reason: str | None


# The library's domain errors -> HTTP. Looked up along the exception's MRO, so a subclass may refine its base.
DOMAIN_ERRORS: dict[type[LiteASRError], _Mapping] = {
    AudioTooLongError: _Mapping(413, INVALID, "audio_too_long", "too_long"),
    AudioDecodeError: _Mapping(415, INVALID, "unsupported_audio", "bad_audio"),
    InvalidOptionError: _Mapping(400, INVALID, "invalid_option", "bad_option"),
    CheckpointError: _Mapping(500, "server_error", "model_error", None),
    LiteASRError: _Mapping(500, "server_error", "internal_error", None),
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


def error_body(message: str, type_: str, code: str) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


def error_event(exc: BaseException) -> tuple[dict, str | None]:
    """The error shape of a failure that happens after a response has started (an SSE `error` event), with its
    label of liteasr_requests_rejected_total (or None)."""
    if isinstance(exc, ServiceError):
        return error_body(exc.message, exc.type, exc.code), exc.reason
    if isinstance(exc, LiteASRError):
        mapping = next(DOMAIN_ERRORS[cls] for cls in type(exc).__mro__ if cls in DOMAIN_ERRORS)
        if mapping.status < 500:
            return error_body(str(exc), mapping.type, mapping.code), mapping.reason
        logger.error("a streamed transcription failed", exc_info=exc)
        return error_body("internal error", mapping.type, mapping.code), mapping.reason
    logger.error("a streamed transcription failed", exc_info=exc)
    return error_body("internal error", "server_error", "internal_error"), None


def error_response(
    status: int, message: str, type_: str, code: str, *, retry_after: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(message, type_, code), status_code=status, headers=headers)


def _count_rejection(request: Request, reason: str | None) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if reason is not None and metrics is not None:
        metrics.requests_rejected.labels(reason).inc()


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    _count_rejection(request, exc.reason)
    if exc.status >= 500 and exc.status != 503:
        logger.warning(
            "%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message
        )
    response = error_response(exc.status, exc.message, exc.type, exc.code, retry_after=exc.retry_after)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="liteasr-admin"'
    return response


async def _domain_error(request: Request, exc: LiteASRError) -> JSONResponse:
    mapping = next(DOMAIN_ERRORS[cls] for cls in type(exc).__mro__ if cls in DOMAIN_ERRORS)
    _count_rejection(request, mapping.reason)
    if mapping.status >= 500:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(mapping.status, "internal error", mapping.type, mapping.code)
    return error_response(mapping.status, str(exc), mapping.type, mapping.code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count_rejection(request, "invalid_request")
    return error_response(422, _describe_validation(exc.errors()), INVALID, "validation_error")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    type_ = INVALID if exc.status_code < 500 else "server_error"
    response = error_response(exc.status_code, message, type_, code)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", "server_error", "internal_error")


def _describe_validation(errors) -> str:
    parts = []
    for error in errors:
        location = ".".join(
            str(part) for part in error.get("loc", ()) if part not in ("body", "query", "form")
        )
        parts.append(
            f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg", "invalid"))
        )
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(LiteASRError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
