"""The web page at /ui: static files shipped in the package (service/ui/), no CDN, works offline.

The page holds no data: it is open like /healthz, and calls the JSON API with fetch, with the API key
the user enters (the same keys, limits and errors as any other client)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}  # every file /ui/ serves, by name
HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the request reaches the file system
        raise HTTPException(404)
    return FileResponse(UI_DIR / name, media_type=ASSETS[name], headers=HEADERS)
