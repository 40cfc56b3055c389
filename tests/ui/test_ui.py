"""The web page at /ui in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright's
Python API; nothing is downloaded) against a live `vae-serve` serving the shipped digits model as
versions 1 and 2, with an API key set.

Without a browser these tests skip, unless CI is set: then a missing browser fails (`.ci/run` installs it).
VAE_UI_SCREENSHOT=PATH saves a screenshot of the page (scores, map, samples) there: `make screenshot`.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
KEY = "ui-test-key"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The first test digit of scikit-learn's 8x8 set (17 levels), as in the README's /score example.
DIGIT = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set and {reason}: .ci/run installs it (apt-get install chromium)")
    pytest.skip(f"{reason} (install Debian's chromium, or set VAE_CHROMIUM=/path/to/chrome)")


def chromium_path() -> str | None:
    env = os.environ.get("VAE_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def png(levels: np.ndarray, top: int = 16) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.round(levels * 255 / top).astype(np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`vae-serve` in a process of its own on a free port."""

    def __init__(self, models: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VAE_API_KEYS": KEY, "VAE_INTRA_OP_THREADS": "1", "VAE_LOG_LEVEL": "warning"}
        cmd = [sys.executable, "-m", "service.cli", "--models", str(models), "--port", str(self.port)]
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vae-serve exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("vae-serve did not get ready in 120 s")

    def post(self, path: str, body: bytes, content_type: str) -> Any:
        import json

        req = urllib.request.Request(
            self.url + path, data=body, headers={"content-type": content_type, "authorization": f"Bearer {KEY}"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def score_upload(self, name: str, data: bytes, **fields: str) -> Any:
        boundary = "vaeuitestboundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.post("/score/upload", body, f"multipart/form-data; boundary={boundary}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("ui")
    models = root / "models"
    for version in ("1", "2"):  # version 2: the same model under another number, to switch versions
        shutil.copytree(REPO / "models" / "digits" / "1", models / "digits" / version)
    server = Service(models, root / "vae-serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        _unavailable("no Chromium browser was found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright's Python package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=["--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    noise = np.random.default_rng(0).integers(0, 17, (8, 8))
    images = {"digit.png": np.array(DIGIT), "noise.png": noise, "wrong-size.png": np.zeros((10, 10))}
    for name, levels in images.items():
        out[name] = tmp_path / name
        out[name].write_bytes(png(levels))
    return out


def open_page(browser: Any, service: Service, key: str | None = KEY) -> Any:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    page.goto(service.url + "/ui")
    if key is not None:
        page.fill("#apikey", key)
        page.dispatch_event("#apikey", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    return page


def cards(page: Any, count: int) -> list[Any]:
    page.wait_for_function(f"document.querySelectorAll('#results .card[data-state]').length >= {count}", timeout=60000)
    return page.query_selector_all("#results .card")


def field(card: Any, name: str) -> str:
    """The value next to a label in a result card's list."""
    return card.evaluate(
        "(c, name) => { for (const dt of c.querySelectorAll('dt')) if (dt.textContent.startsWith(name)) "
        "return dt.nextElementSibling.textContent; return null; }",
        name,
    )


def test_the_page_is_served_open_and_asks_for_the_key(browser: Any, service: Service) -> None:
    page = open_page(browser, service, key=None)
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.inner_text("#error")
    page.fill("#apikey", "not-the-key")
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.getElementById('error').textContent.includes('refused')")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length == 2")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["digits/2", "digits/1"]
    assert page.input_value("#model") == "digits/2"  # the default model's newest version
    assert page.is_hidden("#error")
    assert not page.errors
    page.close()


def test_an_uploaded_png_gets_its_score_and_flag(
    browser: Any, service: Service, files: dict[str, Path], tmp_path: Path
) -> None:
    page = open_page(browser, service)
    page.set_input_files("#files", [str(files["digit.png"]), str(files["noise.png"])])
    digit, noise = cards(page, 2)
    assert digit.get_attribute("data-ood") == "false" and field(digit, "flag") == "in distribution"
    assert noise.get_attribute("data-ood") == "true" and field(noise, "flag") == "OOD: flagged"
    # the figures shown are the API's own for the same file and request; the anomaly map is shown when the
    # live service returns one (it is computed on the reference engine, so its scores come from there),
    # else the page says it is not available
    data = files["digit.png"].read_bytes()
    fields = dict(model="digits", version="2", num_samples="1000", seed="0", fpr="0.01")
    try:
        api = service.score_upload("digit.png", data, anomaly_map="true", **fields)
    except urllib.error.HTTPError as refused:
        assert refused.code == 422
        api = None
    maps_live = api is not None and "anomaly_map" in api["results"][0]
    if not maps_live:
        api = service.score_upload("digit.png", data, **fields)
    r = api["results"][0]
    assert field(digit, "score") == f"{r['score']:.4f} {api['score_units']}"
    assert field(digit, "threshold") == f"{r['threshold']:.4f}"
    assert field(digit, "p-value") == f"{r['p_value']:.4f}"
    assert field(digit, "engine") == api["engine"]
    assert field(digit, "model") == "digits v2"
    assert digit.query_selector("canvas.recon") is not None  # the reconstruction beside the input
    if maps_live:
        assert digit.get_attribute("data-map") == "yes" and digit.query_selector(".legend") is not None
        shown = page.evaluate("() => document.querySelector('#results canvas').toDataURL()")
        page.uncheck("#showmap")
        assert page.evaluate("() => document.querySelector('#results canvas').toDataURL()") != shown
        page.check("#showmap")
        assert page.evaluate("() => document.querySelector('#results canvas').toDataURL()") == shown
    else:
        assert digit.get_attribute("data-map") == "no"
        assert "anomaly maps not available for this model version" in page.inner_text("#notice").lower()
    shot = os.environ.get("VAE_UI_SCREENSHOT")
    page.click("#sample")
    page.wait_for_function("document.querySelectorAll('#samples canvas').length == 16")
    page.screenshot(path=shot or str(tmp_path / "ui.png"), full_page=True)
    assert not page.errors
    page.close()


def test_samples_come_from_the_seed_the_user_gives(browser: Any, service: Service) -> None:
    page = open_page(browser, service)
    page.fill("#n", "4")
    page.fill("#seed", "3")
    page.click("#sample")
    page.wait_for_function("document.getElementById('samples').dataset.seed === '3'")
    assert len(page.query_selector_all("#samples canvas")) == 4
    api = service.post("/sample", b'{"n": 4, "seed": 3, "model": "digits", "version": 2}', "application/json")
    # each sample's pixels on the canvas are the API's levels (17 levels -> grey 255 * level / 16)
    shown = page.evaluate(
        """() => [...document.querySelectorAll('#samples canvas')].map(c => {
             const s = c.width / 8, d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             return [...Array(8).keys()].map(y => [...Array(8).keys()].map(
               x => d[4 * ((y * s + s / 2) * c.width + x * s + s / 2)]));
           })"""
    )
    expected = (np.array(api["images"]) * 255 / 16).astype(np.uint8)  # canvas stores the byte, truncated
    assert np.abs(np.array(shown) - expected).max() <= 1
    page.close()


def test_switching_versions_scores_on_the_chosen_one(browser: Any, service: Service, files: dict[str, Path]) -> None:
    page = open_page(browser, service)
    page.select_option("#model", "digits/1")
    assert "digits v1" in page.inner_text("#model-info")
    page.set_input_files("#files", str(files["digit.png"]))
    (card,) = cards(page, 1)
    assert field(card, "model") == "digits v1"
    page.click("#sample")
    page.wait_for_function("document.getElementById('samples').dataset.model === 'digits/1'")
    page.select_option("#model", "digits/2")
    page.set_input_files("#files", str(files["digit.png"]))
    assert field(cards(page, 2)[1], "model") == "digits v2"
    page.close()


def test_a_wrong_sized_image_gets_the_services_message(browser: Any, service: Service, files: dict[str, Path]) -> None:
    page = open_page(browser, service)
    page.set_input_files("#files", str(files["wrong-size.png"]))
    (card,) = cards(page, 1)
    assert card.get_attribute("data-state") == "error"
    message = page.inner_text("#error")
    assert "wrong-size.png" in message and "10x10" in message and "8x8" in message
    assert not page.errors
    page.close()


def test_a_drawing_made_with_the_keyboard_is_scored(browser: Any, service: Service) -> None:
    page = open_page(browser, service)
    page.focus("#draw")
    for key in ["ArrowUp", "ArrowUp", "Space", "ArrowDown", "Space", "ArrowDown", "Space", "ArrowDown", "Space"]:
        page.keyboard.press(key)
    page.click("#score-drawing")
    (card,) = cards(page, 1)
    assert card.get_attribute("data-state") == "scored"
    assert field(card, "flag") in ("in distribution", "OOD: flagged")
    assert "bits/dim" in field(card, "NLL")
    page.close()


def test_every_control_is_labelled_and_reached_with_tab(browser: Any, service: Service) -> None:
    page = open_page(browser, service)
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button')].filter(el =>
             !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim()
           ).map(el => el.id)"""
    )
    assert unlabelled == []
    assert page.evaluate("() => document.querySelectorAll('[onclick], div[role=button]').length") == 0
    page.reload()  # the key stays for the session; focus starts at the top of the page
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    reached = []
    for _ in range(30):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id"))
    wanted = ["model", "refresh", "apikey", "files", "k", "fpr", "scorename", "showmap", "draw", "score-drawing"]
    wanted += ["sample"]
    positions = [reached.index(w) for w in wanted]
    assert positions == sorted(positions), reached
    page.close()
