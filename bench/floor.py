"""The HTTP floor: vae-serve's HTTP server with every V2 inference answered from a recording.

`python -m bench.floor --models DIR --port N` runs the service exactly as `vae-serve` does (same
settings from VAE_*, same uvicorn configuration, same app), except that a POST to a V2 infer path, after
the first successful one on that path, reads the request's body and sends back the first one's response
without entering the app: no middleware, no parsing, no engine. Its CPU time a request served is the
cost of the HTTP server and the event loop on this machine; the real service's, less it, is the cost
of the service's own code. (Its throughput is not: on 2 cores it is the load generator's limit.) The
answers are wrong for any other input, so this is a bench instrument only, never a way to serve.

`GET /bench/floor/requests` answers how many infer requests it has answered so far (replayed or not),
so the bench can put the server's CPU time over the requests it served, as it does with /metrics for
the real service.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COUNT_PATH = "/bench/floor/requests"


def replaying(app: ASGIApp) -> ASGIApp:
    """`app`, except that V2 infer requests after the first 200 on their path get that response again."""
    recorded: dict[str, list[Message]] = {}
    answered = 0

    async def floor(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal answered
        if scope["type"] == "http" and scope["path"] == COUNT_PATH:
            body = str(answered).encode()
            headers = [(b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        is_infer = scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer")
        if not is_infer:
            await app(scope, receive, send)
            return
        answered += 1
        answer = recorded.get(scope["path"])
        if answer is not None:
            more = True
            while more:  # the body is read as the service would read it, then dropped
                more = (await receive()).get("more_body", False)
            for message in answer:
                await send(message)
            return
        sent: list[Message] = []

        async def record(message: Message) -> None:
            sent.append(message)
            await send(message)

        await app(scope, receive, record)
        if sent and sent[0].get("status") == 200:
            recorded.setdefault(scope["path"], sent)

    return floor


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from service.main import create_app
    from service.server import uvicorn_config
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings: Any = Settings(models_dir=args.models, port=args.port)
    uvicorn.Server(uvicorn_config(replaying(create_app(settings)), settings)).run()


if __name__ == "__main__":
    main()
