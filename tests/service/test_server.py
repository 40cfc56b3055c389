"""The live server's connection guards, cancellation on disconnect, and graceful shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from service.server import OneWriteResponses
from tests.service.conftest import LiveServer, metric_value


def request_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def queued(url: str) -> float:
    return metric_value(urllib.request.urlopen(url + "/metrics").read().decode(), "vae_queued_samples")


def test_the_c_parser_and_loop_are_the_default():
    from service.server import uvicorn_config
    from service.settings import Settings

    def loop_module(config) -> str:
        loop = config.get_loop_factory()()
        loop.close()
        return type(loop).__module__

    config = uvicorn_config(None, Settings())
    assert config.http.__name__ == "GuardedHttpToolsProtocol" and loop_module(config).startswith("uvloop")
    config = uvicorn_config(None, Settings(http_impl="h11", event_loop="asyncio"))
    assert config.http.__name__ == "GuardedH11Protocol" and loop_module(config).startswith("asyncio")


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_slow_heads_and_slow_bodies_are_cut_off(models_dir, http_impl):
    with LiveServer(models_dir, header_timeout_s=0.5, body_timeout_s=0.5, http_impl=http_impl) as server:
        slow_head = socket.create_connection(("127.0.0.1", server.port))
        slow_head.sendall(b"POST /score HTTP/1.1\r\nHost: t\r\n")  # and never the rest
        assert closed_within(slow_head, 10.0)
        slow_body = socket.create_connection(("127.0.0.1", server.port))
        slow_body.sendall(
            b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        slow_body.settimeout(10.0)
        answer = ""
        while "request_timeout" not in answer and (chunk := slow_body.recv(4096)):
            answer += chunk.decode()
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer
        slow_v2 = socket.create_connection(("127.0.0.1", server.port))  # the V2 infer lane reads its own bodies
        slow_v2.sendall(
            b"POST /v2/models/digits-score/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        slow_v2.settimeout(10.0)
        answer = ""
        while "did not arrive" not in answer and (chunk := slow_v2.recv(4096)):
            answer += chunk.decode()
        assert (
            answer.startswith("HTTP/1.1 408") and '{"error":"the request body did not arrive within 0.5 s"}' in answer
        )
        for s in (slow_head, slow_body, slow_v2):
            s.close()


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(4096)
    return head


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_the_head_timeout_holds_for_the_later_requests_of_a_kept_alive_connection(models_dir, http_impl):
    # the head timer is armed only when bytes leave a head unfinished, on any request of a connection
    with LiveServer(models_dir, header_timeout_s=0.5, http_impl=http_impl) as server:
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.settimeout(10.0)
        get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        conn.sendall(get)
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        conn.sendall(get[:10])  # a head in two parts, the second soon: served
        time.sleep(0.1)
        conn.sendall(get[10:])
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        time.sleep(0.8)  # an idle kept-alive connection is uvicorn's keep-alive timeout's, not this one's
        conn.sendall(get)
        assert read_response(conn).startswith(b"HTTP/1.1 200")
        conn.sendall(get[:10])  # and never the rest
        assert closed_within(conn, 10.0)
        conn.close()


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
def test_connections_past_the_cap_are_closed(models_dir, http_impl):
    with LiveServer(models_dir, max_connections=4, header_timeout_s=5, http_impl=http_impl) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port))
        assert closed_within(extra, 2.0)
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert urllib.request.urlopen(server.url + "/healthz").status == 200


V2_SCORE = {  # the same work over the Open Inference Protocol
    "inputs": [{"name": "x", "datatype": "INT64", "shape": [100, 64], "data": [0] * 6400}],
    "parameters": {"num_samples": 10000},
}


@pytest.mark.parametrize(
    "path, body",
    [
        ("/score", {"images": [[0] * 64] * 100, "num_samples": 10000}),  # 1,000,000 importance samples
        ("/v2/models/digits-score/infer", V2_SCORE),
    ],
    ids=["json-api", "v2"],
)
def test_work_stops_when_the_client_goes_away(models_dir, path, body):
    with LiveServer(models_dir, engine="onnxruntime", engine_memory_mb=8) as server:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(request_bytes(path, body))
        for _ in range(100):
            if queued(server.url) > 0:
                break
            time.sleep(0.02)
        assert queued(server.url) > 0
        client.close()  # abandoned
        t0 = time.monotonic()
        while queued(server.url) > 0 and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert queued(server.url) == 0 and time.monotonic() - t0 < 2.0
        assert server.app.state.scheduler.busy_workers == 0 or (time.sleep(0.5) or True)


def test_health_answers_promptly_under_load(models_dir):
    with LiveServer(models_dir, engine="onnxruntime") as server:
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                data = json.dumps({"images": [[0] * 64] * 32, "num_samples": 1000}).encode()
                req = urllib.request.Request(server.url + "/score", data, {"Content-Type": "application/json"})
                try:
                    urllib.request.urlopen(req, timeout=60).read()
                except OSError:
                    pass

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        latencies = []
        for _ in range(40):
            t0 = time.perf_counter()
            urllib.request.urlopen(server.url + "/healthz", timeout=5).read()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join()
    latencies.sort()
    assert latencies[int(0.95 * len(latencies))] < 0.25, latencies[-5:]


def test_sigterm_finishes_in_flight_work_then_exits(models_dir):
    code = textwrap.dedent(f"""
        import json, os, signal, socket, threading, time, urllib.request
        from service.server import serve
        from service.settings import Settings
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        def drive():
            url = f"http://127.0.0.1:{{port}}"
            for _ in range(300):
                try:
                    urllib.request.urlopen(url + "/readyz"); break
                except Exception:
                    time.sleep(0.05)
            body = json.dumps({{"images": [[0] * 64] * 40, "num_samples": 10000}}).encode()
            req = urllib.request.Request(url + "/score", body, {{"Content-Type": "application/json"}})
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
            r = urllib.request.urlopen(req, timeout=60)
            print("in-flight answered", r.status, len(json.load(r)["results"]), flush=True)
            done.set()
        def die_after_the_client(signum, frame):
            # uvicorn re-raises the SIGTERM it caught once it has finished; the client thread may still be
            # reading the answer it was sent, so let it print before the process dies of that signal
            done.wait(10)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        done = threading.Event()
        signal.signal(signal.SIGTERM, die_after_the_client)
        threading.Thread(target=drive, daemon=True).start()
        serve(Settings(models_dir={str(models_dir)!r}, port=port, intra_op_threads=1, engine="onnxruntime",
                       graceful_shutdown_s=30))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "in-flight answered 200 40" in out.stdout, out.stderr[-2000:]
    assert out.returncode == -signal.SIGTERM and "Finished server process" in out.stderr


def test_start_up_objects_are_frozen_out_of_the_collector(models_dir):
    """A full collection over start-up's ~90k objects took ~50 ms, a stall of every request in flight."""
    import gc

    from tests.service.conftest import make_client

    gc.unfreeze()
    with make_client(models_dir):
        assert gc.get_freeze_count() > 10_000


@pytest.mark.parametrize("wanted", [False, True])
def test_fastapis_own_opentelemetry_runs_only_when_asked_for(models_dir, monkeypatch, wanted):
    """With it on, every request asks the global providers whether they are configured (~5.5 us a
    request): off by default, since /metrics is the service's own; VAE_OPENTELEMETRY=true turns it on."""
    import inspect

    import fastapi
    from opentelemetry import trace

    from service.main import create_app
    from service.settings import Settings

    class Configured:  # stands in for an SDK tracer provider set up by the user
        def get_tracer(self, *args, **kwargs):
            return trace.NoOpTracer()

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: Configured())
    app = create_app(Settings(models_dir=models_dir, opentelemetry=wanted))
    if "telemetry" not in inspect.signature(fastapi.FastAPI.__init__).parameters:
        pytest.skip("this FastAPI has no native telemetry")
    assert app._native_telemetry.enabled() is wanted


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Cycle:
    def __init__(self, method: str = "GET", length: int | None = 5) -> None:
        self.scope = {"method": method}
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding = None if length is None else False
        self.expected_content_length = length or 0


def _respond(cycle: _Cycle, out: OneWriteResponses, head: bytes, *bodies: bytes) -> None:
    cycle.response_started = True  # as uvicorn's send() sets it before writing the head
    out.write(head)
    for body in bodies:
        out.write(body)


def test_a_response_head_goes_out_with_its_body_in_one_write():
    t, cycle = _Transport(), _Cycle()
    out = OneWriteResponses(t, cycle)  # type: ignore[arg-type]
    out.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response: at once
    assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    _respond(cycle, out, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", b"hel", b"lo")
    assert t.writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel", b"lo"]
    assert out.is_closing() is False  # everything else is the connection's own


@pytest.mark.parametrize(
    "cycle",
    [_Cycle(length=None), _Cycle(length=0), _Cycle(method="HEAD")],
    ids=["chunked", "empty-body", "head-request"],
)
def test_heads_without_a_body_to_follow_are_written_at_once(cycle):
    t = _Transport()
    out = OneWriteResponses(t, cycle)  # type: ignore[arg-type]
    _respond(cycle, out, b"HTTP/1.1 200 OK\r\n\r\n")
    assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\n"]


def test_closing_writes_a_held_head_first():
    t, cycle = _Transport(), _Cycle()
    out = OneWriteResponses(t, cycle)  # type: ignore[arg-type]
    _respond(cycle, out, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")  # the app failed before its body
    assert t.writes == []
    out.close()
    assert t.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"] and t.closed


def test_head_requests_and_kept_alive_connections_are_answered_whole(models_dir):
    with LiveServer(models_dir) as server:
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.settimeout(10.0)
        for request in (b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n") * 2:
            conn.sendall(request)
            if request.startswith(b"HEAD"):
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                # /healthz takes GET only: a 405 head announcing a JSON body that HEAD never gets
                assert data.startswith(b"HTTP/1.1 405") and b"content-length: 0\r" not in data
            else:
                assert read_response(conn).startswith(b"HTTP/1.1 200")
        conn.close()
