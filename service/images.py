"""Image codecs: JSON arrays, base64 PNG/JPEG and uploaded PNG/JPEG in; PNG out.

Accepted image files: PNG and JPEG only, 8-bit greyscale (L), RGB or palette (converted to
greyscale), bilevel. Refused: other formats (GIF, TIFF, BMP, ...), alpha channels (RGBA, LA: the
background would be a guess), 16-bit and float images. 8-bit pixels map to the model's grey levels
by the contract's formula (vae_contract.formulas.pixels_to_levels).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput
from service.schemas import integral, is_json_integer
from vae_contract.formulas import levels_to_pixels, pixels_to_levels

FORMATS = ("PNG", "JPEG")
MODES = {"L": "L", "RGB": "L", "P": "L", "1": "L"}  # accepted mode -> conversion
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg)?(;[a-z0-9=.+-]+)*;base64,", re.IGNORECASE)


def decode_image_bytes(data: bytes, height: int, width: int, levels: int, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (D,) int64 grey levels."""
    if not data:
        raise InvalidInput("empty image data", where, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            fmt, mode, size = img.format, img.mode, img.size
            if mode not in MODES:
                raise InvalidInput(
                    f"{fmt} image of mode {mode} is not accepted; send 8-bit greyscale, RGB or palette images "
                    "without an alpha channel",
                    where,
                    code="invalid_image",
                )
            if size != (width, height):
                raise InvalidInput(
                    f"image is {size[0]}x{size[1]} (WxH) but the model expects {width}x{height}",
                    where,
                    code="wrong_shape",
                )
            img.load()
            grey = np.asarray(img.convert(MODES[mode]))
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidInput("cannot decode the data as a PNG or JPEG image", where, code="invalid_image") from None
    return pixels_to_levels(grey, levels).reshape(-1)


def parse_base64_image(item: str, height: int, width: int, levels: int, where: str) -> np.ndarray:
    """A base64 PNG/JPEG string, bare or as a data URL (data:image/png;base64,...)."""
    payload = item
    if item[:5].lower() == "data:":
        match = _DATA_URL.match(item)
        if match is None:
            raise InvalidInput(
                "a data URL must look like data:image/png;base64,<base64 data>", where, code="invalid_image"
            )
        payload = item[match.end() :]
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("not valid base64", where, code="invalid_image") from None
    return decode_image_bytes(raw, height, width, levels, where)


def parse_image_items(items: list[Any], height: int, width: int, levels: int, where: str = "images") -> np.ndarray:
    """The JSON API's images: each H x W nested integers, D flat integers, or a base64 PNG/JPEG string.

    Returns (B, D) or (B, H, W) numbers for the core to check; one clear error per bad image.
    """
    rows: list[np.ndarray] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            rows.append(parse_base64_image(item, height, width, levels, at))
            continue
        rows.append(_numbers(item, height, width, at))
    return np.stack(rows)


def _numbers(item: Any, height: int, width: int, where: str) -> np.ndarray:
    if not isinstance(item, list):
        raise InvalidInput("an image is a list of integers, a list of rows, or a base64 string", where)
    flat = item if not item or not isinstance(item[0], list) else None
    if flat is None:
        if len(item) != height or any(not isinstance(r, list) or len(r) != width for r in item):
            raise InvalidInput(
                f"image rows must be {height} lists of {width} integers (or one flat list of {height * width})",
                where,
                code="wrong_shape",
            )
        flat = [v for r in item for v in r]
    elif len(flat) != height * width:
        raise InvalidInput(
            f"image has {len(flat)} values; expected {height * width} ({height} x {width}) or {height} rows",
            where,
            code="wrong_shape",
        )
    ints = integral(flat)
    if ints is None:
        bad = next(v for v in flat if not is_json_integer(v))
        raise InvalidInput(
            f"pixel values must be integer grey levels; found {bad!r} ({type(bad).__name__})",
            where,
            code="invalid_value",
        )
    try:
        return np.asarray(ints, dtype=np.int64)
    except OverflowError:
        raise InvalidInput("pixel values must be grey levels of the model", where, code="out_of_range") from None


def encode_png(images: np.ndarray, levels: int, scale: int = 1, columns: int | None = None) -> bytes:
    """(N, H, W) grey levels -> PNG bytes: the image itself for N=1, else a grid with 1-pixel gaps."""
    n, h, w = images.shape
    pixels = levels_to_pixels(images, levels)
    if n == 1:
        canvas = pixels[0]
    else:
        cols = columns or int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        canvas = np.zeros((rows * (h + 1) - 1, cols * (w + 1) - 1), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = pixels[i]
    if scale > 1:
        canvas = np.kron(canvas, np.ones((scale, scale), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buf, format="PNG")
    return buf.getvalue()
