"""The bench's /healthz prober (bench.serving._probe): it times real answers, on one keep-alive
connection, and reconnects when the server closes it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.serving import _probe


def _serve(keep_alive: bool) -> tuple[ThreadingHTTPServer, list[tuple[str, int]]]:
    seen: list[tuple[str, int]] = []  # (path, client port) of each request answered

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append((self.path, self.client_address[1]))
            body = b'{"status":"ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.parametrize("keep_alive", [True, False])
def test_the_prober_times_each_answer_and_reconnects_when_the_server_closes(keep_alive: bool) -> None:
    server, seen = _serve(keep_alive)
    try:
        took = _probe(f"http://127.0.0.1:{server.server_address[1]}", seconds=0.4, every_s=0.05)
    finally:
        server.shutdown()
        server.server_close()
    assert len(took) >= 3
    assert len(seen) == len(took), "every probe is one request answered"
    assert {path for path, _ in seen} == {"/healthz"}
    assert all(0 < t < 5 for t in took)
    connections = len({port for _, port in seen})
    assert connections == (1 if keep_alive else len(took))
