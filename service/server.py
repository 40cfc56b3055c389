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


def guarded_protocol(max_connections: int, header_timeout: float, base: type[Any] = H11Protocol) -> type[Any]:
    """`base` (uvicorn's h11 or httptools protocol) with the head timeout and the connection cap."""

    class GuardedProtocol(base):
        _head_timer: asyncio.TimerHandle | None = None

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
