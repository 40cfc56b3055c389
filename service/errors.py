"""Domain errors, raised below the routes, and the one place that turns them into HTTP statuses.

Code under the protocols (the core, the repository, the scheduler, the codecs) raises a
`ServiceError` subclass; it never picks an HTTP status. `http_status` maps error -> status for every
protocol, and the two response shapes are built here:
  JSON API:  {"error": {"status", "code", "message", "where"}}
  V2 (Open Inference Protocol):  {"error": "message"}
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("vae_serve")


class ServiceError(Exception):
    """A failure the client should see: a stable machine code, a message, and where (a field path)."""

    code = "error"

    def __init__(self, message: str, where: str | None = None, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.message, self.where = message, where
        if code is not None:
            self.code = code
        self.extra = extra


class InvalidInput(ServiceError):
    """The request is well-formed but its values cannot be used (shape, range, limits, unknown names)."""

    code = "invalid_input"


class BadRequest(ServiceError):
    """The request cannot be parsed at all (not JSON, not UTF-8, a malformed V2 binary body)."""

    code = "bad_request"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    code = "body_too_large"


class NotFound(ServiceError):
    code = "not_found"


class UnknownModel(NotFound):
    code = "unknown_model"


class NotReady(ServiceError):
    code = "not_ready"


class Overloaded(ServiceError):
    """Admission control refused the work; `retry_after` seconds is a hint for the client."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: int, where: str | None = None):
        super().__init__(message, where)
        self.retry_after = max(1, int(retry_after))


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class Cancelled(ServiceError):
    """The client went away; nothing is sent."""

    code = "cancelled"


class Unauthenticated(ServiceError):
    code = "unauthenticated"


class Forbidden(ServiceError):
    code = "forbidden"


class RequestTimeout(ServiceError):
    code = "request_timeout"


#: error class -> HTTP status; the most specific class wins (the MRO is searched in order).
STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 422,
    BadRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    Cancelled: 499,
    NotReady: 503,
    Overloaded: 503,
    DeadlineExceeded: 504,
}
#: The Open Inference Protocol reports a request it cannot use as 400, whatever the reason.
V2_STATUS = {**STATUS, InvalidInput: 400}


def http_status(exc: ServiceError, table: dict[type[ServiceError], int] = STATUS) -> int:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return 500


def headers_for(exc: ServiceError) -> dict[str, str]:
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, Unauthenticated):
        return {"WWW-Authenticate": 'Bearer realm="vae-serve"'}
    return {}


def error_body(status: int, code: str, message: str, where: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": message, "where": where, **extra}}


def v2_error_body(message: str) -> dict[str, str]:
    return {"error": message}
