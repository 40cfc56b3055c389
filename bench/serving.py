"""Over HTTP: the real `vae-serve` in its own process, driven by load generators in other processes.

perf_analyzer (Triton's C++ load tool, speaking the Open Inference Protocol) measures throughput and
latency percentiles; a small asyncio client measures overload behaviour, while a blocking prober in a
third process times /healthz. The server's memory is read from /proc (VmRSS now, VmHWM = peak).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vae-serve` in a child process with VAE_* settings; stopped with SIGTERM.

    floor=True runs bench.floor instead: the same server, answering V2 inference from a recording."""

    def __init__(self, models: Path, floor: bool = False, **settings: Any):
        self.floor = floor
        self.port = free_port()
        env = {**os.environ, "VAE_LOG_LEVEL": "warning"}
        env.update({f"VAE_{k.upper()}": str(v) for k, v in settings.items()})
        exe = [sys.executable, "-m", "bench.floor"] if floor else [str(Path(sys.executable).parent / "vae-serve")]
        self.proc = subprocess.Popen(
            [*exe, "--models", str(Path(models).resolve()), "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import urllib.request

        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vae-serve exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                urllib.request.urlopen(self.url + "/readyz", timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("vae-serve did not become ready")

    def memory_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process so far, all its threads together (/proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def infer_requests(self) -> int:
        """V2 infer requests the server has answered: from /metrics (any status), or the floor's own count."""
        import urllib.request

        if self.floor:
            from bench.floor import COUNT_PATH

            return int(urllib.request.urlopen(self.url + COUNT_PATH, timeout=10).read())
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        return round(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vae_requests_total{") and '/infer"' in line
            )
        )

    def __exit__(self, *exc: Any) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def perf_analyzer_binary() -> tuple[Path | None, dict[str, str]]:
    """perf_analyzer from .venv-perf (make bench installs tritonclient==2.51.0 there) or $PERF_ANALYZER."""
    explicit = os.environ.get("PERF_ANALYZER")
    exe = Path(explicit) if explicit else ROOT / ".venv-perf" / "bin" / "perf_analyzer"
    if not exe.exists():
        return None, {}
    libs = sorted((exe.parent.parent / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ)
    if libs:  # perf_analyzer links libcudart at start-up though HTTP never uses CUDA
        env["LD_LIBRARY_PATH"] = ":".join([str(libs[0]), env.get("LD_LIBRARY_PATH", "")])
    return exe, env


def load_turn(server: Server, model: str, rows: np.ndarray, concurrency: int, window_ms: int) -> dict[str, Any]:
    """One perf_analyzer run against `server`, with the CPU time it cost the server and perf_analyzer.

    Throughput alone cannot say which side of the socket bounds it (on a 2-core machine perf_analyzer
    can be the limit); CPU time a request served can, and is what a cut to the server's code changes.
    """
    import resource

    cpu0, served0, wall0 = server.cpu_seconds(), server.infer_requests(), time.perf_counter()
    gen0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = perf_analyzer(server.url, model, "x", rows, [concurrency], window_ms=window_ms)[str(concurrency)]
    gen1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, wall1 = server.cpu_seconds(), time.perf_counter()
    served = server.infer_requests() - served0
    wall = wall1 - wall0
    generator = (gen1.ru_utime + gen1.ru_stime) - (gen0.ru_utime + gen0.ru_stime)
    if served > 0:
        res["server_cpu_us_per_request"] = round((cpu1 - cpu0) / served * 1e6, 1)
        res["perf_analyzer_cpu_us_per_request"] = round(generator / served * 1e6, 1)
    res["server_cores_busy"] = round((cpu1 - cpu0) / wall, 2)  # CPU seconds a second: 1.0 is one core
    res["perf_analyzer_cores_busy"] = round(generator / wall, 2)
    return res


def perf_analyzer(
    url: str, model: str, input_name: str, rows: np.ndarray, concurrency: list[int], window_ms: int = 4000
) -> dict[str, Any]:
    """Throughput (requests/s) and latency percentiles (ms) per concurrency, one image per request."""
    exe, env = perf_analyzer_binary()
    if exe is None:
        return {"error": "perf_analyzer not found: run `make bench` (it installs .venv-perf) or set PERF_ANALYZER"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps({"data": [{input_name: {"content": r.tolist(), "shape": [len(r)]}} for r in rows]}))
        for c in concurrency:
            report = Path(tmp) / f"c{c}.csv"
            cmd = [
                str(exe), "-m", model, "-u", url.removeprefix("http://"), "-i", "http", "-b", "1",
                "--concurrency-range", str(c), "--input-data", str(data), "-f", str(report),
                "--measurement-mode", "time_windows", "--measurement-interval", str(window_ms),
                "--stability-percentage", "50", "--max-trials", "6",
            ]  # fmt: skip
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if run.returncode not in (0, 2) or not report.exists():  # 2: not stable within max-trials
                out[str(c)] = {"error": (run.stdout + run.stderr)[-400:]}
                continue
            row = next(csv.DictReader(report.open()))
            out[str(c)] = {
                "requests_per_s": round(float(row["Inferences/Second"]), 1),
                "p50_ms": round(int(row["p50 latency"]) / 1000, 2),
                "p95_ms": round(int(row["p95 latency"]) / 1000, 2),
                "p99_ms": round(int(row["p99 latency"]) / 1000, 2),
                "stable": run.returncode == 0,
            }
    return out


async def _overload(url: str, body: dict, clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    statuses: dict[int, int] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = await client.post("/score", json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                elif r.status_code == 503:
                    await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 0.5))

        await asyncio.gather(*[worker() for _ in range(clients)])
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "seconds": seconds,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "accepted_p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
    }


def _probe(url: str, seconds: float, path: str = "/healthz", every_s: float = 0.05) -> list[float]:
    """Seconds each GET `path` took, one every `every_s` for `seconds`, on a keep-alive connection.

    Blocking http.client in a process of its own: a probe inside the load generator's event loop times
    that loop too (with 64 clients on 2 cores it read /healthz p99 1.1-1.3 s while this one, beside it,
    read 18 ms). A probe that fails counts the time it took to fail."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    took: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        for _attempt in range(2):  # a kept connection the server has since closed: once more on a new one
            try:
                conn.request("GET", path)
                conn.getresponse().read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()  # the next request opens a new connection
        took.append(time.perf_counter() - t0)
        time.sleep(every_s)
    conn.close()
    return took


def overload(url: str, images: list, k: int, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients sending `images` at K each, back to back for `seconds`, while /healthz is probed
    from a third process (_probe)."""
    code = (
        "import asyncio, json, sys; from bench.serving import _overload; "
        "a = json.loads(sys.stdin.read()); "
        "print(json.dumps(asyncio.run(_overload(a['url'], a['body'], a['clients'], a['seconds']))))"
    )
    probe_code = f"import json; from bench.serving import _probe; print(json.dumps(_probe({url!r}, {seconds!r})))"
    prober = subprocess.Popen([sys.executable, "-c", probe_code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    payload = {"url": url, "body": {"images": images, "num_samples": k}, "clients": clients, "seconds": seconds}
    run = subprocess.run(  # the load generator runs in its own process
        [sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    probes = np.array(json.loads(prober.communicate(timeout=120)[0] or "[]")) * 1000
    if run.returncode != 0:
        return {"error": run.stderr[-500:]}
    out = json.loads(run.stdout)
    if len(probes):
        out["healthz_p99_ms"] = round(float(np.percentile(probes, 99)), 1)
        out["healthz_max_ms"] = round(float(probes.max()), 1)
    return out


def abandoned(url: str, images: list, k: int, after_s: float = 1.0) -> dict[str, Any]:
    """Send one large /score, hang up after `after_s`, and time until the server has no queued work left."""
    import urllib.request

    def queued() -> float:
        text = urllib.request.urlopen(url + "/metrics").read().decode()
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith("vae_queued_samples ")))

    body = json.dumps({"images": images, "num_samples": k}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /score HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    time.sleep(after_s)
    before = queued()
    sock.close()
    t0 = time.monotonic()
    while queued() > 0 and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    return {
        "request": f"{len(images)} images x K={k}",
        "queued_when_abandoned": before,
        "idle_after_s": round(time.monotonic() - t0, 3),
    }


def reload_under_load(url: str, models: Path, key: str, image: list, seconds: float = 12.0) -> dict[str, Any]:
    """Clients score without pause while version 2 is added, reloaded, removed and reloaded again."""
    import threading

    import httpx

    statuses: dict[int, int] = {}
    stop = threading.Event()
    headers = {"authorization": f"Bearer {key}"}

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/score", json={"images": [image], "num_samples": 1000})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    steps = []
    src, dst = models / "digits" / "1", models / "digits" / "2"
    time.sleep(seconds / 4)
    shutil.copytree(src, dst)
    steps.append(httpx.post(url + "/admin/reload", headers=headers, timeout=120).json()["scan"])
    time.sleep(seconds / 4)
    shutil.rmtree(dst)
    steps.append(httpx.post(url + "/admin/reload", headers=headers, timeout=120).json()["scan"])
    time.sleep(seconds / 4)
    stop.set()
    for t in threads:
        t.join()
    return {
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "scans": [{k: v for k, v in s.items() if v} for s in steps],
    }


def have_tools() -> dict[str, bool]:
    return {"perf_analyzer": perf_analyzer_binary()[0] is not None, "httpx": shutil.which("python") is not None}
