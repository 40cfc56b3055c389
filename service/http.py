"""HTTP plumbing shared by both protocols: error responses, body limits, access control, request contexts.

Error statuses come from service/errors.py (`http_status`); this module only renders them: the JSON
API's shape everywhere but under /v2, where the Open Inference Protocol's {"error": "..."} is used.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import RequestContext
from service.errors import (
    V2_STATUS,
    BadRequest,
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthenticated,
    UnsupportedMediaType,
    error_body,
    headers_for,
    http_status,
    v2_error_body,
)
from service.settings import Settings

log = logging.getLogger("vae_serve")
OPEN_PATHS = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}  # never need a key
UI_PATH = "/ui"  # the web page (service/routes/ui.py) holds no data: open; its API calls carry the key
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(path: str, exc: ServiceError) -> JSONResponse:
    headers = headers_for(exc)
    if is_v2(path):
        message = f"{exc.where}: {exc.message}" if exc.where else exc.message
        return JSONResponse(v2_error_body(message), status_code=http_status(exc, V2_STATUS), headers=headers)
    status = http_status(exc)
    return JSONResponse(error_body(status, exc.code, exc.message, exc.where, **exc.extra), status, headers=headers)


def _loc(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if tuple(first.get("loc", ())) == ("body", "files") and first.get("type") == "missing":
            form = await request.form()
            got = ", ".join(sorted(set(form.keys()))) or "none"
            message = f"send the images as files in the multipart field 'files' (fields received: {got})"
            return error_response(request.url.path, InvalidInput(message, "files"))
        details = [{"where": _loc(e.get("loc", ())), "message": e.get("msg", "")} for e in errors[:10]]
        err = ServiceError(
            str(first.get("msg", "invalid request")), _loc(tuple(first.get("loc", ()))), code="invalid_request"
        )
        if is_v2(request.url.path):
            return JSONResponse(v2_error_body(f"{err.where}: {err.message}"), status_code=400)
        return JSONResponse(error_body(422, err.code, err.message, err.where, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail)
        if status == 400 and "parsing the body" in message:
            message = "the body cannot be parsed: send UTF-8 JSON (or multipart/form-data for the upload endpoints)"
        headers = dict(exc.headers or {})
        if is_v2(request.url.path):
            return JSONResponse(v2_error_body(message), status_code=status, headers=headers)
        body = error_body(status, HTTP_CODES.get(status, "http_error"), message)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return unexpected_response(request.url.path)


def parse_json(body: bytes) -> Any:
    """A request body as JSON (RFC 8259), parsed once, in C, with bounded depth and memory.

    orjson refuses what the standard library would turn into a 500 or a hang: nesting past 1024 levels
    (json.loads recurses until RecursionError), integers of thousands of digits (ValueError past
    sys.get_int_max_str_digits), NaN and Infinity literals, numbers that overflow a double, lone
    surrogates, invalid UTF-8 and a byte-order mark. Integers past 64 bits become floats, which the
    schemas then refuse where an integer is needed. Duplicate keys keep the last value, as json.loads.
    The parsed value holds at most ~22 bytes of Python objects a byte of body ("[[],[],...]", measured
    in tests/service/test_hostile_json.py), so the body limit bounds it.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "not valid utf-8" in str(exc).lower():
            raise BadRequest("the body is not UTF-8 text; send UTF-8 encoded JSON", "body") from None
        raise BadRequest(f"the body is not valid JSON: {exc}", "body") from None


@dataclass(frozen=True)
class JsonBudget:
    """The most arrays/objects and strings a JSON API request can need: images as nested lists (H x W, or
    H x W x C for colour) or base64 strings, latents as one list each, and a few hundred fields besides."""

    containers: int
    strings: int
    FIELDS: ClassVar[int] = 256

    @classmethod
    def of(cls, settings: Settings, models: dict[str, dict[int, Any]]) -> JsonBudget:
        """The budget for these settings and served models, computed once per repository scan: every scan
        swaps in a new snapshot of `models`, so the last one asked for is kept (holding it keeps its
        identity from being reused). Each JSON and V2 request asks."""
        last = _budget_cache.get("last")
        if last is not None and last[0] is models and last[1] is settings:
            return last[2]
        budget = cls._compute(settings, models)
        _budget_cache["last"] = (models, settings, budget)
        return budget

    @classmethod
    def _compute(cls, settings: Settings, models: dict[str, dict[int, Any]]) -> JsonBudget:
        # an image as nested lists: one list, one per row, and one per pixel for colour (H x W x C)
        versions = [mv for vs in models.values() for mv in vs.values()]
        lists = max((1 + mv.height * (1 + (mv.width if mv.channels > 1 else 0)) for mv in versions), default=1)
        return cls(cls.FIELDS + settings.max_batch * lists, 2 * (cls.FIELDS + settings.max_batch))


_budget_cache: dict[str, tuple[Any, Settings, JsonBudget]] = {}


def check_json_structure(body: bytes, budget: JsonBudget) -> None:
    """Refuses (422; V2: 400) a body with more arrays, objects or strings than any request needs, unparsed.

    Parsed, a body of numbers takes at most ~20 bytes of Python objects a byte (list slots, ints, floats;
    tests/service/test_hostile_json.py measures it), but an empty array or object takes ~33 and more
    ("[[],[],...]", 3 bytes each). Counting brackets and quotes first (in C, ~1 ms a MB; brackets inside
    strings count too, which only errs towards refusing odd bodies) caps those at the budget, so a parsed
    body holds at most ~24 bytes a byte of body plus ~100 bytes a container or string of the budget."""
    containers = body.count(b"[") + body.count(b"{")
    strings = body.count(b'"') // 2
    if containers > budget.containers or strings > budget.strings:
        raise InvalidInput(
            f"the body holds {containers} arrays and objects and {strings} strings; requests here need at most "
            f"{budget.containers} and {budget.strings} (images as rows or base64 strings, at most the max "
            "batch of them)",
            "body",
            code="too_complex",
        )


class ParsedJsonRequest(Request):
    """A request whose body was read and parsed already: FastAPI's validation takes the parsed value."""

    def __init__(self, request: Request, raw: bytes, parsed: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


class JsonRoute(APIRoute):
    """A route whose body must be UTF-8 JSON sent as application/json: clear 415 and 400 answers otherwise.

    The body is parsed here, once (parse_json), and handed to FastAPI's validation as parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method == "POST":
                ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json" and not ctype.endswith("+json"):
                    raise UnsupportedMediaType(
                        f"send the body as JSON with Content-Type: application/json (got {ctype or 'no content type'})",
                        "content-type",
                    )
                body = await request.body()
                if not body:
                    raise BadRequest("the body is empty; send a JSON object", "body")
                state = request.app.state
                check_json_structure(body, JsonBudget.of(state.settings, state.repository.models))
                request = ParsedJsonRequest(request, body, parse_json(body))
            return await handler(request)

        return checked


class InternalErrorMiddleware:
    """A bug answers 500 in the protocol's error shape and leaves the connection open.

    Starlette's ServerErrorMiddleware re-raises after answering, and uvicorn then drops the connection:
    the client's next request on it would fail with "connection reset by peer". Here an error raised
    before the response started is logged and answered, and goes no further."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await unexpected_response(scope.get("path", ""))(scope, receive, send)


def unexpected_response(path: str) -> JSONResponse:
    """The 500 for a bug, in the protocol's shape: it names no detail (the log has them)."""
    message = "internal server error; see the service log"
    if is_v2(path):
        return JSONResponse(v2_error_body(message), status_code=500)
    return JSONResponse(error_body(500, "internal_error", message), status_code=500)


async def wait_disconnect(receive: Receive) -> None:
    """Completes when the client disconnects (the body has been read, so receive() waits for that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def request_context(request: Request, timeout_s: float | None) -> RequestContext:
    settings: Settings = request.app.state.settings
    return RequestContext.start(settings, timeout_s, lambda: wait_disconnect(request.receive))


class BodyReader:
    """Reads a whole request body: PayloadTooLarge past max_bytes (declared or chunked), RequestTimeout when
    a part takes longer than timeout_s to arrive. Used by BodyLimitMiddleware and service.v2.InferLane."""

    def __init__(self, max_bytes: int, timeout_s: float) -> None:
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    async def read(self, scope: Scope, receive: Receive) -> bytes | None:
        """The body, or None when the client disconnected before sending all of it."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                raise PayloadTooLarge(self._message(), "body")
        chunks: list[bytes] = []
        size = 0
        more = True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timer:  # one timer, moved on per message: no task per read
                while more and size <= self.max_bytes:
                    timer.reschedule(loop.time() + self.timeout_s)
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body = message.get("body", b"")
                    size += len(body)
                    chunks.append(body)
                    more = message.get("more_body", False)
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
        if size > self.max_bytes:
            raise PayloadTooLarge(self._message(), "body")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _message(self) -> str:
        return f"the request body exceeds the limit of {self.max_bytes} bytes"


class BodyLimitMiddleware:
    """Reads the whole body before the app sees it (BodyReader): 413 past the limit, 408 when slow."""

    def __init__(self, app: ASGIApp, reader: BodyReader) -> None:
        self.app, self.reader = app, reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            whole = await self.reader.read(scope, receive)
        except ServiceError as exc:
            await _render(scope, send, exc)
            return
        if whole is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _render(scope: Scope, send: Send, exc: ServiceError) -> None:
    response = error_response(scope.get("path", ""), exc)
    await response(scope, _noop_receive, send)


async def _noop_receive() -> Message:
    return {"type": "http.disconnect"}


class ApiKeys:
    """Bearer API keys, compared in constant time. With keys set, everything but liveness and readiness
    needs one (401 without, 403 wrong); /admin always needs one, so it is closed when no key is set.
    Applied by AuthMiddleware and service.v2.InferLane."""

    def __init__(self, keys: list[str], routes: Callable[[], list[Any]] | None = None) -> None:
        self.keys = [k.encode() for k in keys]
        self.routes = routes

    def _routed(self, scope: Scope) -> bool:
        """Whether a route takes this method and path: the router answers 404 and 405 itself, before any key."""
        if self.routes is None:
            return True
        return any(route.matches(scope)[0] == Match.FULL for route in self.routes())

    def _valid(self, token: bytes) -> bool:
        ok = False
        for key in self.keys:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(token, key)
        return ok

    def refusal(self, scope: Scope, routed: bool | None = None) -> ServiceError | None:
        """Why this request may not go on (401, 403), or None. routed: whether a route takes its method
        and path, when the caller knows (None: look it up)."""
        path = scope.get("path", "")
        admin = path.startswith("/admin")
        if path in OPEN_PATHS or path == UI_PATH or path.startswith(UI_PATH + "/") or (not self.keys and not admin):
            return None
        if not (self._routed(scope) if routed is None else routed):
            return None
        if not self.keys:
            return Forbidden("the admin endpoints are disabled: set VAE_API_KEYS to enable them")
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return Unauthenticated("this endpoint needs an API key: Authorization: Bearer <key>")
        if not self._valid(token.strip()):
            return Forbidden("the API key is not valid")
        return None


class AuthMiddleware:
    """Answers 401 or 403 where ApiKeys refuses a request (preflight OPTIONS requests pass, for CORS)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        refused = self.keys.refusal(scope)
        if refused is not None:
            await _render(scope, send, refused)
            return
        await self.app(scope, receive, send)
