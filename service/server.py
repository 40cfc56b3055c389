"""Running the app under uvicorn with the connection guards this service needs.

uvicorn closes idle keep-alive connections itself (keep_alive_s) and drains in-flight requests on
SIGTERM (graceful_shutdown_s). It has no limit on how slowly a request head may arrive and accepts
any number of connections, so the protocol below adds both: a connection is closed when its request
head takes longer than header_timeout_s, and new connections past max_connections are closed at once.
A slow body is answered 408 by the body-limit middleware. SIGHUP rescans the model repository.

The HTTP parser is httptools and the event loop uvloop where they are installed (they are in the
serve extra): both are C, and per small request they cut the server's own time by a third against
h11 and asyncio's loop (README Performance). `http_impl` and `event_loop` choose explicitly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings


def http_protocol_class(impl: str) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for `impl`; auto is uvicorn's own choice (httptools where installed)."""
    if impl == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    if impl == "h11":
        return H11Protocol
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


class OneWriteResponses:
    """A request's view of its connection's transport that writes a response's head together with its body.

    uvicorn's httptools protocol writes the status line and headers when the app sends
    http.response.start and the body when it sends http.response.body: two system calls, and two TCP
    segments the client wakes up for, per response. Held until the body comes, a head that announces
    a body (Content-Length above 0, not chunked, not a HEAD request) goes out with it in one write:
    0.89x the server's CPU a one-digit V2 encode at concurrency 32 (README Performance). Anything else
    (100 Continue, chunked or empty bodies, later writes) is written at once, and close() writes a
    held head first.
    """

    __slots__ = ("_transport", "_cycle", "_held", "_first")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport, self._cycle = transport, cycle
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first and self._cycle.response_started:
            self._first = False  # this is the head (uvicorn writes it in one piece)
            c = self._cycle
            if (
                c.chunked_encoding is False
                and c.expected_content_length > 0
                and not c.response_complete
                and c.scope["method"] != "HEAD"  # uvicorn writes no body for HEAD
            ):
                self._held = data
                return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def close(self) -> None:
        if self._held is not None:
            self._transport.write(self._held)
            self._held = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, ...: the connection's own
        return getattr(self._transport, name)


def guarded_protocol(max_connections: int, header_timeout: float, base: type[Any] = H11Protocol) -> type[Any]:
    """`base` (uvicorn's h11 or httptools protocol) with the head timeout and the connection cap, and
    on httptools one write a response (OneWriteResponses)."""
    one_write = base.__name__ == "HttpToolsProtocol"

    class GuardedProtocol(base):
        _head_timer: asyncio.TimerHandle | None = None

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if one_write and cycle is not None and cycle.transport is self.transport:
                cycle.transport = OneWriteResponses(self.transport, cycle)

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.logger.warning("closing a connection: %d are open (max_connections)", len(self.connections) - 1)
                transport.close()
                return
            self._arm()

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timeout, self.cycle)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self, cycle: Any) -> None:
            self._head_timer = None
            if self.cycle is cycle and self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            # Armed only when bytes leave a head unfinished: a head that arrives whole (nearly every one)
            # costs no timer; the clock still starts with the head's first bytes.
            super().data_received(data)
            if self._waiting_for_head():
                if not self.transport.is_closing():
                    self._arm()
            else:
                self._disarm()  # a request head arrived; a slow body is the middleware's business

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=guarded_protocol(
            settings.max_connections, settings.header_timeout_s, http_protocol_class(settings.http_impl)
        ),
        loop=settings.event_loop,  # uvicorn's own names; its auto takes uvloop where installed
        timeout_keep_alive=int(max(1, settings.keep_alive_s)),
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        backlog=min(2048, settings.max_connections * 2),
        server_header=False,
    )


def serve(settings: Settings) -> None:
    from service.main import create_app

    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
