"""Image codecs: JSON arrays, base64 PNG and uploaded PNG/JPEG in; integer arrays and PNG out.

8-bit pixels p map to the nearest grey level, floor(p (levels - 1) / 255 + 1/2) (as training's
requantize does), and levels back to pixels as floor(l 255 / (levels - 1) + 1/2); for any number of
levels the two round-trip exactly.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import APIError


def pixels_to_levels(pixels: np.ndarray, levels: int) -> np.ndarray:
    return np.floor(pixels.astype(np.float64) * (levels - 1) / 255.0 + 0.5).astype(np.int64)


def levels_to_pixels(images: np.ndarray, levels: int) -> np.ndarray:
    return np.floor(images.astype(np.float64) * 255.0 / (levels - 1) + 0.5).astype(np.uint8)


def decode_image_bytes(data: bytes, height: int, width: int, levels: int, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (D,) int64 grey levels; 422 when undecodable or of the wrong size."""
    if not data:
        raise APIError(422, "invalid_image", "empty image data", where)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            grey = img.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise APIError(422, "invalid_image", f"cannot decode the image as PNG or JPEG: {exc}", where) from exc
    if grey.size != (width, height):
        raise APIError(
            422,
            "wrong_shape",
            f"image is {grey.size[0]}x{grey.size[1]} (WxH) but the model expects {width}x{height}",
            where,
        )
    return pixels_to_levels(np.asarray(grey), levels).reshape(-1)


def parse_image(item: Any, height: int, width: int, levels: int, where: str) -> np.ndarray:
    """One JSON image: nested H x W integers, flat D integers, or a base64 PNG/JPEG string."""
    if isinstance(item, str):
        payload = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIError(422, "invalid_image", f"not valid base64: {exc}", where) from exc
        return decode_image_bytes(raw, height, width, levels, where)
    try:
        array = np.asarray(item)
    except ValueError as exc:  # ragged nesting
        raise APIError(422, "wrong_shape", f"rows of different lengths: {exc}", where) from exc
    dim = height * width
    if array.shape not in ((height, width), (dim,)):
        raise APIError(
            422, "wrong_shape", f"image has shape {list(array.shape)}; expected [{height}, {width}] or [{dim}]", where
        )
    if array.dtype.kind not in "iu":
        raise APIError(422, "invalid_value", f"pixel values must be integers, got {array.dtype}", where)
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= levels:
        raise APIError(
            422,
            "out_of_range",
            f"pixel values range over [{lo}, {hi}]; this model takes grey levels 0..{levels - 1}",
            where,
        )
    return array.reshape(-1).astype(np.int64)


def parse_images(items: list[Any], height: int, width: int, levels: int, field: str = "images") -> np.ndarray:
    return np.stack([parse_image(item, height, width, levels, f"{field}[{i}]") for i, item in enumerate(items)])


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
