"""Generated OOD sets for `vae-ood-eval`: images shaped like a model's test split, nothing downloaded.

Two directions. Sets *harder* than the data (noise, shuffled pixels, inverted images, photo patches) and
sets *simpler* than the data (constant images, smooth blobs, upscaled 8x8 digits, clothing silhouettes,
rendered text): a likelihood model of natural images tends to rate simple images as more likely than its
own data, so the simple sets are the ones that tell the scores apart. Every set is (N, H, W, C) int64 in
[0, levels), any H and W, C 1 (grey) or 3 (colour), and a function of the seed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from vae_contract.formulas import pixels_to_levels

# Tokens of a dataset spec that name digit images: the `digits` set is no OOD set for such a model.
DIGIT_DATASETS = ("mnist", "usps", "svhn", "digit")
NOT_DIGIT_DATASETS = ("fashion", "kmnist", "kuzushiji")
WORDS = (
    "OPEN", "stop", "SALE", "exit", "cat", "dog", "Hello", "the", "and", "ok", "NO", "yes", "data", "Menu",
    "TAXI", "cafe", "BAR", "love", "map", "sun", "Hi", "WiFi", "info", "A4", "x", "EUR", "km", "Vol",
)  # fmt: skip
SET_NAMES = ("noise", "inverted", "constant", "shuffled", "smooth", "natural", "digits", "silhouettes", "text")
TEXT_FONT_PX = 40  # the scalable default font's size; the rendering is scaled to the image afterwards


def digits_in_distribution(dataset: str | None) -> bool:
    """Whether a dataset spec (the manifest's `training.config.dataset`) names digit images: the built-in
    `digits` or an MNIST-like source (a path naming mnist, usps or svhn, but not Fashion- or Kuzushiji-MNIST)."""
    if not dataset:
        return False
    name = dataset.lower()
    return any(t in name for t in DIGIT_DATASETS) and not any(t in name for t in NOT_DIGIT_DATASETS)


def ood_sets(
    test: np.ndarray,
    levels: int,
    seed: int = 0,
    dataset: str | None = None,
    skip: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Generated OOD images shaped like `test` (N, H, W, C) with levels 0..levels-1 (grey or colour).

    `dataset` is the model's data source spec: the `digits` set is left out where it names digits
    (`digits_in_distribution`); `skip` leaves out further sets by name.
    """
    rng = np.random.default_rng(seed)
    n, h, w, c = test.shape
    top = levels - 1
    yy, xx = np.mgrid[0:h, 0:w]
    blobs = np.zeros((n, h, w))
    for i in range(n):  # 1-3 wide Gaussian blobs: smooth, low-complexity images
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            s = rng.uniform(1.5, 3.5) * max(h, w) / 8
            blobs[i] += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    blobs = np.rint(top * blobs / blobs.reshape(n, -1).max(1)[:, None, None]).astype(np.int64)
    pixels = test.reshape(n, h * w, c)
    sets = {
        "noise": rng.integers(0, levels, size=(n, h, w, c)),
        "inverted": top - test.astype(np.int64),
        "constant": np.broadcast_to((np.arange(n) % levels)[:, None, None, None], (n, h, w, c)).copy(),
        "shuffled": np.stack([img[rng.permutation(h * w)] for img in pixels]).reshape(n, h, w, c),
        "smooth": np.repeat(blobs[..., None], c, axis=3),
        "natural": natural_patches(n, h, w, levels, rng, c),
    }
    # the simple direction; each from its own generator, so one set's draws do not move another's
    simple: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
        "digits": lambda g: digit_images(n, h, w, levels, g, c),
        "silhouettes": lambda g: silhouettes(n, h, w, levels, g, c),
        "text": lambda g: text_images(n, h, w, levels, g, c),
    }
    left_out = set(skip) | ({"digits"} if digits_in_distribution(dataset) else set())
    for i, (name, make) in enumerate(simple.items()):
        if name not in left_out:
            sets[name] = make(np.random.default_rng([seed, 1 + i]))
    return {name: images for name, images in sets.items() if name not in left_out}


def natural_patches(n: int, h: int, w: int, levels: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Patches of scikit-learn's bundled sample photos (grey or RGB), reduced to (h, w) and the model's levels:
    (n, h, w, channels)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    mode = "L" if channels == 1 else "RGB"
    photos = [np.asarray(Image.fromarray(img).convert(mode)) for img in load_sample_images().images]
    out = np.empty((n, h, w, channels), dtype=np.int64)
    for i in range(n):
        photo = photos[i % len(photos)]
        most = min(photo.shape[:2]) - 1  # large images: crops up to the whole photo's short side
        size = int(rng.integers(min(4 * h, most // 2), min(12 * h, most)))
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        patch = Image.fromarray(photo[y : y + size, x : x + size]).resize((w, h), Image.Resampling.BOX)
        out[i] = np.floor(np.asarray(patch, dtype=np.float64) * (levels - 1) / 255 + 0.5).reshape(h, w, channels)
    return out


def digit_images(n: int, h: int, w: int, levels: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """scikit-learn's bundled 8x8 digits (17 levels), drawn at random, resized to (h, w) bilinearly and mapped
    onto the model's levels; grey, repeated into every channel: (n, h, w, channels)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.float32)  # (1797, 8, 8), 0..16
    pick = rng.choice(len(digits), size=n, replace=n > len(digits))
    out = np.empty((n, h, w, channels), dtype=np.int64)
    for i, j in enumerate(pick):
        big = np.asarray(Image.fromarray(digits[j]).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
        out[i] = np.clip(np.floor(big * (levels - 1) / 16 + 0.5), 0, levels - 1)[..., None]
    return out


# Clothing outlines in a unit box (x right, y down), Fashion-MNIST's kinds, upright.
_TSHIRT = [(0.3, 0.04), (0.4, 0.1), (0.5, 0.13), (0.6, 0.1), (0.7, 0.04), (0.97, 0.2), (0.87, 0.42), (0.76, 0.34),
           (0.77, 0.97), (0.23, 0.97), (0.24, 0.34), (0.13, 0.42), (0.03, 0.2)]  # fmt: skip
_SHIRT = [(0.32, 0.03), (0.5, 0.12), (0.68, 0.03), (0.88, 0.12), (0.99, 0.88), (0.86, 0.9), (0.78, 0.38),
          (0.79, 0.97), (0.21, 0.97), (0.22, 0.38), (0.14, 0.9), (0.01, 0.88), (0.12, 0.12)]  # fmt: skip
_TROUSERS = [(0.28, 0.02), (0.72, 0.02), (0.8, 0.98), (0.59, 0.98), (0.5, 0.28), (0.41, 0.98), (0.2, 0.98)]
_DRESS = [(0.37, 0.02), (0.44, 0.08), (0.56, 0.08), (0.63, 0.02), (0.65, 0.3), (0.6, 0.42), (0.86, 0.98),
          (0.14, 0.98), (0.4, 0.42), (0.35, 0.3)]  # fmt: skip
_SNEAKER = [(0.02, 0.58), (0.12, 0.46), (0.36, 0.42), (0.5, 0.3), (0.64, 0.28), (0.72, 0.46), (0.95, 0.6),
            (0.98, 0.76), (0.02, 0.76)]  # fmt: skip
_BOOT = [(0.3, 0.04), (0.62, 0.04), (0.64, 0.48), (0.95, 0.62), (0.98, 0.82), (0.03, 0.82), (0.05, 0.62),
         (0.27, 0.5)]  # fmt: skip
_BAG = [(0.08, 0.38), (0.92, 0.38), (0.97, 0.96), (0.03, 0.96)]
# (outline, detail line drawn in another shade: a seam, a sole, a waistband, a flap; None: none)
_CLOTHES: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]] | None]] = {
    "tshirt": (_TSHIRT, [(0.4, 0.1), (0.5, 0.2), (0.6, 0.1)]),
    "shirt": (_SHIRT, [(0.5, 0.12), (0.5, 0.97)]),
    "trousers": (_TROUSERS, [(0.27, 0.08), (0.73, 0.08)]),
    "dress": (_DRESS, [(0.36, 0.32), (0.64, 0.32)]),
    "sneaker": (_SNEAKER, [(0.03, 0.7), (0.97, 0.7)]),
    "boot": (_BOOT, [(0.04, 0.75), (0.97, 0.75)]),
    "bag": (_BAG, [(0.08, 0.5), (0.5, 0.62), (0.92, 0.5)]),
}


def _place(
    frame: tuple[float, float, float, float, float], points: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Unit-box points -> canvas points: scaled to a (box_w, box_h) box centred on (cx, cy), turned by angle."""
    cx, cy, box_w, box_h, angle = frame
    cos, sin = np.cos(angle), np.sin(angle)
    out = []
    for u, v in points:
        a, b = (u - 0.5) * box_w, (v - 0.5) * box_h
        out.append((float(cx + a * cos - b * sin), float(cy + a * sin + b * cos)))
    return out


def _oversample(h: int, w: int) -> int:
    """Drawing scale: shapes are drawn at least 64 pixels across and box-filtered down (anti-aliased edges)."""
    return max(1, int(np.ceil(64 / min(h, w))))


def silhouettes(n: int, h: int, w: int, levels: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Clothing silhouettes in Fashion-MNIST's look: one filled T-shirt, shirt, trousers, dress, sneaker, boot
    or bag per image, of random size, position, tilt and grey level, on a dark background, with one seam in
    another shade; grey, repeated into every channel: (n, h, w, channels)."""
    from PIL import Image, ImageDraw

    f = _oversample(h, w)
    big_w, big_h = f * w, f * h
    kinds = list(_CLOTHES)
    out = np.empty((n, h, w, channels), dtype=np.int64)
    for i in range(n):
        outline, detail = _CLOTHES[kinds[rng.integers(len(kinds))]]
        size = rng.uniform(0.6, 0.95)
        box_w, box_h = size * big_w * rng.uniform(0.85, 1.1), size * big_h * rng.uniform(0.9, 1.05)
        cx = big_w * (0.5 + rng.uniform(-0.12, 0.12))
        cy = big_h * (0.5 + rng.uniform(-0.12, 0.12))
        frame = (cx, cy, box_w, box_h, np.deg2rad(rng.uniform(-12, 12)))
        background = int(rng.integers(0, 24))
        fill = int(rng.integers(90, 256))
        canvas = Image.new("L", (big_w, big_h), background)
        draw = ImageDraw.Draw(canvas)
        if outline is _BAG:  # a handle above the body
            hx0, hy0 = _place(frame, [(0.3, 0.08)])[0]
            hx1, hy1 = _place(frame, [(0.7, 0.6)])[0]
            box = (min(hx0, hx1), min(hy0, hy1), max(hx0, hx1), max(hy0, hy1))
            draw.ellipse(box, outline=fill, width=max(1, round(0.06 * box_w)))
        draw.polygon(_place(frame, outline), fill=fill)
        if detail is not None:
            shade = int(np.clip(fill * rng.uniform(0.45, 0.8), background, 255))
            draw.line(_place(frame, detail), fill=shade, width=max(1, round(0.035 * box_w)))
        small = canvas.resize((w, h), Image.Resampling.BOX)
        out[i] = pixels_to_levels(np.asarray(small), levels)[..., None]
    return out


def _default_font() -> Any:
    """Pillow's default font: the scalable one (Pillow >= 10.1, with FreeType) at TEXT_FONT_PX, else the
    small bitmap one (its renderings are scaled up like any other)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=TEXT_FONT_PX)
    except (TypeError, OSError):  # an older Pillow (no size) or no FreeType
        return ImageFont.load_default()


def _word(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    if kind == 0:
        return str(rng.integers(0, 10 ** rng.integers(1, 5)))
    if kind == 1:
        return f"{rng.integers(0, 100)}.{rng.integers(0, 100):02d}"
    return str(WORDS[rng.integers(len(WORDS))])


def text_images(n: int, h: int, w: int, levels: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Short words and numbers rendered with Pillow's default font: one or two tokens (on one line or two),
    regular to bold, light on dark or dark on light (grey levels, or RGB colours for a colour model), of
    random size and position: (n, h, w, channels)."""
    from PIL import Image, ImageDraw, ImageFont

    font = _default_font()
    scalable = isinstance(font, ImageFont.FreeTypeFont)
    font_px = float(font.size) if scalable else 0.0  # the bitmap font: no strokes
    f = _oversample(h, w)
    big_w, big_h = f * w, f * h
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((n, h, w, channels), dtype=np.int64)
    for i in range(n):
        text = _word(rng)
        if rng.random() < (0.4 if min(h, w) >= 16 else 0.1):  # small images: mostly one token, larger
            text += ("\n" if rng.random() < 0.5 else " ") + _word(rng)
        # regular to bold (a stroke in the ink's own colour, up to 5% of the font size); small images: bolder
        bold = int(font_px * (rng.choice([0.0, 0.025, 0.05]) + (0.075 if min(h, w) < 16 else 0.0)) + 0.5)
        # the text's own rendering, a tight mask, then scaled into the image
        bbox = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font, stroke_width=bold)
        x0, y0, x1, y1 = (round(v) for v in bbox)
        mask = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
        ImageDraw.Draw(mask).text((1 - x0, 1 - y0), text, fill=255, font=font, stroke_width=bold, stroke_fill=255)
        scale = min(rng.uniform(0.55, 0.95) * big_w / mask.width, rng.uniform(0.3, 0.9) * big_h / mask.height)
        size = (max(1, round(mask.width * scale)), max(1, round(mask.height * scale)))
        mask = mask.resize(size, Image.Resampling.BILINEAR if scalable else Image.Resampling.NEAREST)  # crisp bitmap
        x = int(rng.integers(0, big_w - size[0] + 1))
        y = int(rng.integers(0, big_h - size[1] + 1))
        light = rng.integers(170, 256, size=channels)
        dark = rng.integers(0, 86, size=channels)
        ink, paper = (light, dark) if rng.random() < 0.5 else (dark, light)
        canvas = Image.new(mode, (big_w, big_h), _colour(paper))
        canvas.paste(_colour(ink), (x, y, x + size[0], y + size[1]), mask)
        small = np.asarray(canvas.resize((w, h), Image.Resampling.BOX))
        out[i] = pixels_to_levels(small, levels).reshape(h, w, channels)
    return out


def _colour(values: np.ndarray) -> int | tuple[int, ...]:
    return int(values[0]) if len(values) == 1 else tuple(int(v) for v in values)
