"""bench/floor.py's replaying wrapper: the instrument behind make bench's HTTP floor."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.floor import COUNT_PATH, replaying


def _request(app: Any, method: str, path: str, body: bytes) -> list[dict[str, Any]]:
    chunks = [{"type": "http.request", "body": body[:3], "more_body": True},
              {"type": "http.request", "body": body[3:], "more_body": False}]  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path}, receive, send))
    assert not chunks, "the whole body was read"
    return sent


def test_the_floor_replays_the_first_good_answer_of_an_infer_path_and_passes_the_rest_through():
    calls: list[tuple[str, bytes]] = []
    status = {"code": 503}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message["more_body"]
        calls.append((scope["path"], body))
        await send({"type": "http.response.start", "status": status["code"], "headers": []})
        await send({"type": "http.response.body", "body": body.upper()})

    floor = replaying(app)
    infer = "/v2/models/digits-encode/infer"
    assert _request(floor, "POST", infer, b"first")[0]["status"] == 503  # an error is not recorded
    status["code"] = 200
    first = _request(floor, "POST", infer, b"second")
    again = _request(floor, "POST", infer, b"third")
    assert again == first and first[1]["body"] == b"SECOND"  # replayed, not answered
    assert [body for _, body in calls] == [b"first", b"second"]
    _request(floor, "POST", "/v2/models/digits-score/infer", b"other")  # each path its own recording
    _request(floor, "GET", infer, b"getit")  # only POSTs to infer paths replay
    assert [body for _, body in calls][2:] == [b"other", b"getit"]


def test_the_floor_counts_the_infer_requests_it_answered():
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["more_body"]:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    floor = replaying(app)
    assert _count(floor) == 0
    for _ in range(3):  # one answered by the app, two replayed
        _request(floor, "POST", "/v2/models/digits-encode/infer", b"image")
    _request(floor, "GET", "/v1/models", b"none!")  # not an infer request
    assert _count(floor) == 3


def _count(app: Any) -> int:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "GET", "path": COUNT_PATH}, None, send))
    assert sent[0]["status"] == 200
    return int(sent[1]["body"])
