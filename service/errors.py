"""One JSON error shape for every failure: {"error": {"status", "code", "message", "where"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vae_serve")


class APIError(Exception):
    """A failure the client should see: status, a stable machine code, a message, and where."""

    def __init__(self, status: int, code: str, message: str, where: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.where = status, code, message, where


def error_body(status: int, code: str, message: str, where: str | None = None, **extra: Any) -> dict:
    return {"error": {"status": status, "code": code, "message": message, "where": where, **extra}}


def error_response(status: int, code: str, message: str, where: str | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, where, **extra), status_code=status)


def _loc(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.where)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        details = [{"where": _loc(e.get("loc", ())), "message": e.get("msg", "")} for e in errors[:20]]
        return error_response(
            422, "invalid_request", first.get("msg", "invalid request"), _loc(first.get("loc", ())), details=details
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error; see the service log")
