"""Image codecs: JSON arrays, base64 PNG/JPEG and uploaded PNG/JPEG in; PNG out. Grey and colour.

A model takes images of H x W pixels with C channels (1: grey, 3: RGB) at its number of levels; the
graphs take them flat, D = H W C values, channel fastest. What files become:
- PNG and JPEG only; 8-bit grey (L), RGB, palette (P) and bilevel (1) images are converted to the
  model's mode as Pillow converts them: colour to grey by ITU-R 601-2 luma, grey to colour by repeating
  it. Refused (422, saying what the model takes): other formats (GIF, TIFF, BMP, ...), alpha channels
  (RGBA, LA, PA: the background would be a guess), 16-bit and float images, CMYK and other colour spaces.
- A file of another size is refused (wrong_shape), unless the model records a resize
  (manifest image.preprocessing.resize, from `vae-train --image-size`): then any size is resized to the
  model's H x W with the same filter training used (Lanczos).
8-bit pixels map to the model's levels by the contract's formula (vae_contract.formulas.pixels_to_levels).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput
from service.schemas import integral, is_json_integer
from vae_contract.formulas import levels_to_pixels, pixels_to_levels

FORMATS = ("PNG", "JPEG")
CONVERTIBLE = ("L", "RGB", "P", "1")  # modes a file may have: each converts to L or RGB without a guess
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg)?(;[a-z0-9=.+-]+)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageFormat:
    """What one image of a model is: H x W pixels of C channels at `levels` levels, and how files get there."""

    height: int
    width: int
    channels: int
    levels: int
    resize: bool = False  # resize files of another size to H x W (the model recorded a training resize)

    @classmethod
    def of(cls, image: dict[str, Any]) -> ImageFormat:
        """From a manifest's image section (format 2: grey, never resized)."""
        pre = image.get("preprocessing") or {}
        return cls(
            int(image["height"]),
            int(image["width"]),
            int(image.get("channels", 1)),
            int(image["levels"]),
            bool(pre.get("resize")),
        )

    @property
    def dim(self) -> int:
        return self.height * self.width * self.channels

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def describe(self) -> str:
        kind = "grey" if self.channels == 1 else "RGB colour"
        return f"{self.width}x{self.height} (WxH) {kind} images"


def decode_image_bytes(data: bytes, fmt: ImageFormat, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (D,) int64 levels of the model's format."""
    if not data:
        raise InvalidInput("empty image data", where, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            fmt_name, mode, size = img.format, img.mode, img.size
            if mode not in CONVERTIBLE:
                raise InvalidInput(
                    f"{fmt_name} image of mode {mode} is not accepted; this model takes {fmt.describe()}: send "
                    "8-bit greyscale, RGB or palette PNG/JPEG without an alpha channel (grey and colour are "
                    "converted to the model's mode)",
                    where,
                    code="invalid_image",
                )
            if size != (fmt.width, fmt.height) and not fmt.resize:
                raise InvalidInput(
                    f"image is {size[0]}x{size[1]} (WxH) but this model takes {fmt.describe()}",
                    where,
                    code="wrong_shape",
                )
            img.load()
            converted = img.convert(fmt.mode)
            if converted.size != (fmt.width, fmt.height):
                converted = converted.resize((fmt.width, fmt.height), Image.Resampling.LANCZOS)
            pixels = np.asarray(converted)
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InvalidInput("cannot decode the data as a PNG or JPEG image", where, code="invalid_image") from None
    return pixels_to_levels(pixels, fmt.levels).reshape(-1)


def parse_base64_image(item: str, fmt: ImageFormat, where: str) -> np.ndarray:
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
    return decode_image_bytes(raw, fmt, where)


def parse_image_items(items: list[Any], fmt: ImageFormat, where: str = "images") -> np.ndarray:
    """The JSON API's images: each H x W (grey) or H x W x C nested integers, D flat integers, or a base64
    PNG/JPEG string. Returns (B, D) numbers for the core to check; one clear error per bad image."""
    rows: list[np.ndarray] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            rows.append(parse_base64_image(item, fmt, at))
            continue
        rows.append(_numbers(item, fmt, at))
    return np.stack(rows)


def _shape_help(fmt: ImageFormat) -> str:
    nested = f"{fmt.height} rows of {fmt.width}" + ("" if fmt.channels == 1 else f" pixels of {fmt.channels}")
    return f"{nested} integers, or one flat list of {fmt.dim}" + ("" if fmt.channels == 1 else " (channel fastest)")


def _flatten(item: list[Any], fmt: ImageFormat, where: str) -> list[Any]:
    """H x W (grey) or H x W x C nested lists -> one flat list, or InvalidInput naming the expected shape."""
    ok = len(item) == fmt.height and all(isinstance(r, list) and len(r) == fmt.width for r in item)
    if ok and fmt.channels == 1 and not any(isinstance(v, list) for r in item for v in r):
        return [v for r in item for v in r]
    if ok and fmt.channels > 1 and all(isinstance(px, list) and len(px) == fmt.channels for r in item for px in r):
        return [v for r in item for px in r for v in px]
    kind = "grey" if fmt.channels == 1 else "colour"
    raise InvalidInput(f"this model takes {kind} images: {_shape_help(fmt)}", where, code="wrong_shape")


def _numbers(item: Any, fmt: ImageFormat, where: str) -> np.ndarray:
    if not isinstance(item, list):
        raise InvalidInput("an image is a list of integers, a list of rows, or a base64 string", where)
    if item and isinstance(item[0], list):
        flat = _flatten(item, fmt, where)
    elif len(item) != fmt.dim:
        raise InvalidInput(f"image has {len(item)} values; it must be {_shape_help(fmt)}", where, code="wrong_shape")
    else:
        flat = item
    ints = integral(flat)
    if ints is None:
        bad = next(v for v in flat if not is_json_integer(v))
        raise InvalidInput(
            f"pixel values must be integer levels; found {bad!r} ({type(bad).__name__})",
            where,
            code="invalid_value",
        )
    try:
        return np.asarray(ints, dtype=np.int64)
    except OverflowError:
        raise InvalidInput("pixel values must be levels of the model", where, code="out_of_range") from None


def encode_png(images: np.ndarray, levels: int, scale: int = 1, columns: int | None = None) -> bytes:
    """(N, H, W) grey or (N, H, W, C) colour levels -> PNG bytes: the image itself for N=1, else a grid
    with 1-pixel gaps."""
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    n, h, w = images.shape[:3]
    pixels = levels_to_pixels(images, levels)
    if n == 1:
        canvas = pixels[0]
    else:
        cols = columns or int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        canvas = np.zeros((rows * (h + 1) - 1, cols * (w + 1) - 1, *images.shape[3:]), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = pixels[i]
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="L" if canvas.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


# A perceptually ordered dark-to-bright ramp (after matplotlib's "inferno"), for heat maps without matplotlib.
_HEAT = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]], dtype=np.float64,
)  # fmt: skip
OVERLAY_MIN_SIDE = 160  # pixels: small images are upscaled (nearest) to at least this before drawing


def heat_colours(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB (..., 3) float in [0, 255] along the ramp."""
    pos = np.clip(t, 0.0, 1.0) * (len(_HEAT) - 1)
    lo = np.minimum(pos.astype(int), len(_HEAT) - 2)
    frac = (pos - lo)[..., None]
    return _HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac


def overlay_png(images: np.ndarray, levels: int, maps: np.ndarray, threshold: float, units: str) -> bytes:
    """Each image (N, H, W[, C]) beside its anomaly map (N, H, W) laid over it, one row an image, and a colour
    scale: 0 (a pixel as costly as on normal images) is dark and transparent, the scale's top (twice the pixel
    threshold, or the largest value shown) bright and opaque, over a dimmed grey copy of the image; the flagged
    pixels (above the threshold) are outlined in cyan."""
    from PIL import ImageDraw, ImageFont

    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    up = max(1, -(-OVERLAY_MIN_SIDE // max(h, w)))
    rgb = levels_to_pixels(images, levels).astype(np.float64)
    rgb = np.repeat(rgb, 3, axis=3) if c == 1 else rgb
    top = max(2.0 * threshold, float(np.quantile(maps, 0.999)), 1e-6)
    t = np.clip(maps / top, 0.0, 1.0)[..., None]
    # the heat over a dimmed grey copy of the image: its colours stay readable on bright pixels
    base = 0.5 * rgb.mean(axis=3, keepdims=True)
    alpha = 0.3 + 0.6 * t
    over = (1 - alpha) * base + alpha * heat_colours(t[..., 0])
    over_up = over.repeat(up, axis=1).repeat(up, axis=2)
    flagged = (maps > threshold).repeat(up, axis=1).repeat(up, axis=2)
    padded = np.pad(flagged, ((0, 0), (1, 1), (1, 1)))
    inner = padded[:, 1:-1, 2:] & padded[:, 1:-1, :-2] & padded[:, 2:, 1:-1] & padded[:, :-2, 1:-1]
    over_up[flagged & ~inner] = (0, 255, 255)  # the flagged regions' outlines, one screen pixel wide
    gap, bar_w, label_w = 4, 14, 70
    side_h, side_w = h * up, w * up
    canvas = Image.new("RGB", (2 * side_w + 3 * gap + bar_w + label_w, n * (side_h + gap) + gap + 14), "white")
    for i in range(n):
        y = gap + i * (side_h + gap)
        tiles = (rgb[i].repeat(up, axis=0).repeat(up, axis=1), over_up[i])
        for j, arr in enumerate(tiles):
            canvas.paste(Image.fromarray(np.rint(arr).astype(np.uint8)), (gap + j * (side_w + gap), y))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x0, y0, y1 = 2 * side_w + 3 * gap, gap, canvas.height - gap - 14
    ramp = heat_colours(np.linspace(1.0, 0.0, max(2, y1 - y0)))
    for k, colour in enumerate(np.rint(ramp).astype(int)):
        draw.line([(x0, y0 + k), (x0 + bar_w, y0 + k)], fill=tuple(int(v) for v in colour))
    for value, label in ((top, f"{top:.1f}"), (threshold, f"{threshold:.1f} flag"), (0.0, "0")):
        yy = y0 + int(round((1 - value / top) * (y1 - y0 - 1)))
        draw.line([(x0 + bar_w, yy), (x0 + bar_w + 3, yy)], fill="black")
        draw.text((x0 + bar_w + 5, max(y0, min(yy - 5, y1 - 10))), label, fill="black", font=font)
    draw.text(
        (gap, canvas.height - 13), f"input | anomaly map ({units}); cyan: flagged pixels", fill="black", font=font
    )
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
