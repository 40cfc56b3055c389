"""Image data sources: every source yields uint8 images (N, H, W, C) and their number of levels.

C is 1 (grey) or 3 (colour, RGB); `channels` ("auto", 1 or 3) decides: auto keeps colour where the
images have it (a colour source whose channels are all equal is grey). Sources are named by a spec string:
  digits          scikit-learn's built-in 8x8 digits, 17 levels, the seed text's split by index
  idx:PATH        an MNIST-format IDX image file (gzipped or not), 256 levels, seeded split
  folder:PATH     a folder of PNG/JPEG files (colour kept), 256 levels, seeded split
  npy:PATH        one integer array (N, H, W) or (N, H, W, C), 256 levels unless told, seeded split
  npz:PATH        arrays 'train'/'val'/'test' (a fixed split) or one array 'images'; an optional
                  scalar 'levels' declares the number of levels
Colour becomes grey by ITU-R 601-2 luma (vae_contract.formulas.rgb_to_grey, Pillow's convert("L")), grey
becomes colour by repeating it. What was done is recorded (ImageData.preprocessing) for the manifest, so
the service applies the same to uploaded files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vae_contract import sources
from vae_contract.formulas import requantize, rgb_to_grey

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CHANNELS = ("auto", "1", "3")
RESAMPLE = "lanczos"  # how folder images are resized to --image-size (Pillow's LANCZOS), and so uploads
DIGITS_SPLIT = {"train": [0, 1000], "val": [1000, 1350], "test": [1350, None]}


class DataError(ValueError):
    """A data source that cannot be read or does not hold what it must."""


@dataclass
class ImageData:
    """Train / validation / test images of one source, as uint8 levels in [0, levels), (N, H, W, C)."""

    train: np.ndarray  # (N_train, H, W, C) uint8
    val: np.ndarray  # (N_val, H, W, C) uint8
    test: np.ndarray  # (N_test, H, W, C) uint8
    levels: int
    source: str
    split: dict[str, Any] = field(default_factory=dict)  # how the split was made, for the manifest
    # what was done to the source's pixels: {"convert": "L" | "RGB" | None, "resize": [H, W] | None, ...}
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):  # grey (N, H, W) arrays are C = 1
            images = getattr(self, name)
            if images.ndim == 3:
                setattr(self, name, images[..., None])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return int(self.train.shape[1]), int(self.train.shape[2]), int(self.train.shape[3])

    @property
    def channels(self) -> int:
        return self.shape[2]

    @property
    def dim(self) -> int:
        h, w, c = self.shape
        return h * w * c

    def flat(self, part: str) -> np.ndarray:
        """One split as (N, D) int64 (D = H W C, channel fastest), the form the networks take."""
        images = np.asarray(getattr(self, part)[:])
        return images.reshape(len(images), -1).astype(np.int64)


def has_colour(images: np.ndarray) -> bool:
    """Whether (N, H, W[, C]) images hold colour: three channels that are not all equal."""
    if isinstance(images, LazyRows):  # a block at a time, once per source
        base = images.base
        if getattr(base, "colour", None) is None:
            block = stream_block(base)
            base.colour = base.ndim == 4 and any(has_colour(base[i : i + block]) for i in range(0, len(base), block))
        return bool(base.colour)
    return (
        images.ndim == 4
        and images.shape[3] == 3
        and not ((images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all())
    )


def as_channels(images: np.ndarray, channels: int, where: str) -> tuple[np.ndarray, str | None]:
    """(N, H, W) or (N, H, W, C) -> (N, H, W, channels), and the conversion made ("L": colour to grey,
    "RGB": grey to colour, None). Colour files holding grey pictures (R = G = B) lose nothing to "L"."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise DataError(
            f"{where}: expected images of shape (N, H, W) or (N, H, W, C) with C 1 or 3, got shape {images.shape}"
        )
    have = images.shape[3]
    if channels == have:
        return images, None
    if channels == 1:
        if images.max(initial=0) > 255:
            raise DataError(f"{where}: colour to grey needs 8-bit values (0..255)")
        return rgb_to_grey(images)[..., None], "L"
    return np.repeat(images, 3, axis=3), "RGB"


def check_levels(images: np.ndarray, levels: int, where: str) -> np.ndarray:
    """Refuse non-integer dtypes and values outside [0, levels); return uint8 images."""
    if not np.issubdtype(images.dtype, np.integer):
        raise DataError(f"{where}: dtype {images.dtype} is not an integer type; store grey levels as integers (uint8)")
    if images.ndim not in (3, 4):
        raise DataError(f"{where}: expected images of shape (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{where}: holds no images")
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi >= levels:
        raise DataError(f"{where}: values range over [{lo}, {hi}] but the declared levels are 0..{levels - 1}")
    return images.astype(np.uint8)


class LazyRows:
    """Images of a memory-mapped array picked by an index, read (and converted) only when sliced: what a
    streamed source's splits hold instead of arrays. `rows[key]` gives uint8 (B, H, W, C) like an array's."""

    def __init__(
        self, base: np.ndarray, index: np.ndarray, channels: int | None = None, levels: tuple[int, int] = (0, 0)
    ):
        self.base, self.index = base, index
        self.channels = channels or (base.shape[3] if base.ndim == 4 else 1)
        self.levels = levels  # (from, to): requantize on read when they differ

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.index), int(self.base.shape[1]), int(self.base.shape[2]), self.channels)

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.asarray(self.index[key])
        if rows.ndim == 0:
            return self[np.atleast_1d(key)][0]
        order = np.argsort(rows, kind="stable")  # read the file in order, hand the rows back in theirs
        picked = np.empty((len(rows), *self.base.shape[1:]), dtype=self.base.dtype)
        picked[order] = self.base[rows[order]]
        out, _ = as_channels(picked, self.channels, "stream")
        if self.levels[0] != self.levels[1]:
            out = requantize(out, *self.levels)
        return out.astype(np.uint8, copy=False)

    def with_channels(self, channels: int) -> LazyRows:
        return LazyRows(self.base, self.index, channels, self.levels)

    def with_levels(self, levels_in: int, levels_out: int) -> LazyRows:
        return LazyRows(self.base, self.index, self.channels, (levels_in, levels_out))


STREAM_BLOCK_BYTES = 64 * 2**20  # a pass over a streamed source reads this much at a time


def stream_block(base: Any) -> int:
    """Images a pass over a streamed source reads at a time."""
    return max(1, STREAM_BLOCK_BYTES // int(np.prod(base.shape[1:])))


class FileArray:
    """A C-ordered array in a file (a .npy's or an IDX file's data), read with positioned reads: the rows read
    pass through the page cache, not this process's memory, which a memory map's pages would fill (and
    count in its RSS) as an epoch touches every image."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.colour: bool | None = None
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd: int | None = None

    @classmethod
    def of(cls, mapped: np.memmap) -> FileArray:
        if not mapped.flags.c_contiguous or mapped.filename is None:
            raise DataError("a streamed source must be a C-ordered array in a file")
        return cls(str(mapped.filename), int(mapped.offset), mapped.shape, mapped.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:  # a copy in another process opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def _read(self, start: int, count: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        want = count * self.row_bytes
        raw = os.pread(self._fd, want, self.offset + start * self.row_bytes)
        if len(raw) != want:
            raise DataError(f"{self.path}: the file is shorter than its header says")
        return raw

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            raw = self._read(start, max(0, stop - start))
            return np.frombuffer(raw, dtype=self.dtype).reshape(-1, *self.shape[1:])
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        i = 0
        while i < len(rows):  # one read per run of consecutive rows
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            flat[i:j] = np.frombuffer(self._read(int(rows[i]), j - i), dtype=np.uint8).reshape(j - i, -1)
            i = j
        return out


def split_index(n: int, fractions: list[float], seed: int, source: str) -> list[np.ndarray]:
    """The train/val/test rows of a deterministic random split of n images."""
    if n < 3:
        raise DataError(f"{source}: needs at least 3 images to split into train/val/test, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{source}: too few images ({n}) for a train/val/test split")
    return np.split(order, [n_train, n_train + n_val])


def seeded_split(images: np.ndarray, fractions: list[float], seed: int, source: str, levels: int) -> ImageData:
    """A deterministic random train/val/test split of one array of images."""
    parts = [images[rows] for rows in split_index(len(images), fractions, seed, source)]
    split = {"kind": "seeded", "seed": seed, "fractions": list(fractions), "sizes": [len(p) for p in parts]}
    return ImageData(parts[0], parts[1], parts[2], levels, source, split)


def streamed_split(base: Any, fractions: list[float], seed: int, source: str, levels: int) -> ImageData:
    """`seeded_split` of a memory-mapped array without reading it into memory: the same images in the same
    order, as LazyRows. The levels are checked in one pass, a block at a time."""
    if base.ndim not in (3, 4) or not np.issubdtype(base.dtype, np.integer):
        check_levels(base[:1], levels, source)  # the same refusal as an array source's
    if base.ndim == 4 and base.shape[3] not in (1, 3):
        as_channels(base[:1], 1, source)  # refuses C other than 1 or 3
    file = FileArray.of(base) if isinstance(base, np.memmap) else base
    block, colour = stream_block(file), False
    for i in range(0, len(file), block):
        images = check_levels(file[i : i + block], levels, f"{source} [images {i}..]")
        colour = colour or has_colour(images)
    file.colour = colour  # what `has_colour` of its splits says, without another pass
    parts = [LazyRows(file, rows) for rows in split_index(len(file), fractions, seed, source)]
    split = {"kind": "seeded", "seed": seed, "fractions": list(fractions), "sizes": [len(p) for p in parts]}
    return ImageData(parts[0], parts[1], parts[2], levels, source, split)  # type: ignore[arg-type]


# --- readers -------------------------------------------------------------------------------


def load_digits(classes: list[int] | None = None) -> ImageData:
    """scikit-learn's bundled 8x8 digits, split by index as the seed text does."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[..., None]  # values 0..16, (N, 8, 8, 1)
    labels = bunch.target
    (a, b), (c, d), (e, _) = DIGITS_SPLIT["train"], DIGITS_SPLIT["val"], DIGITS_SPLIT["test"]
    parts = [(images[a:b], labels[a:b]), (images[c:d], labels[c:d]), (images[e:], labels[e:])]
    if classes is not None:
        keep = set(int(k) for k in classes)
        parts = [(x[np.isin(y, list(keep))], y[np.isin(y, list(keep))]) for x, y in parts]
    split = {
        "kind": "index",
        "train": DIGITS_SPLIT["train"],
        "val": DIGITS_SPLIT["val"],
        "test": DIGITS_SPLIT["test"],
        "classes": classes,
    }
    return ImageData(parts[0][0], parts[1][0], parts[2][0], 17, "digits", split)


def digits_labels(part: str) -> np.ndarray:
    """Class labels of one digits split (for evaluations that need them)."""
    from sklearn.datasets import load_digits as sk_load_digits

    lo, hi = DIGITS_SPLIT[part]
    return sk_load_digits().target[lo:hi]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX (MNIST-format) unsigned-byte image file, gzipped or not, as (N, H, W) uint8."""
    try:
        return sources.read_idx(path)
    except sources.SourceError as exc:
        raise DataError(str(exc)) from exc


def folder_files(path: Path) -> list[Path]:
    """The PNG/JPEG files under a folder, sorted by name."""
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: holds no PNG or JPEG files")
    return files


def decode_file(file: Path, image_size: list[int] | None, modes: set[str] | None = None) -> np.ndarray:
    """One PNG/JPEG file as 8-bit RGB (H, W, 3), resized to image_size [H, W] if given; its mode into `modes`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            if modes is not None:
                modes.add(img.mode)
            # 16-bit grey (I;16) keeps its top 8 bits: Pillow's convert would clip it at 255
            rgb = img.point(lambda v: v / 256).convert("RGB") if img.mode.startswith("I") else img.convert("RGB")
            if image_size is not None:
                rgb = rgb.resize((image_size[1], image_size[0]), Image.Resampling.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{file}: cannot decode image: {exc}") from exc


def _same_size(file: Path, array: np.ndarray, first: Path, first_shape: tuple[int, ...]) -> None:
    if array.shape != first_shape:
        raise DataError(
            f"{file}: size {array.shape[1]}x{array.shape[0]} differs from {first.name}'s "
            f"{first_shape[1]}x{first_shape[0]}; pass --image-size H W to resize all images"
        )


def folder_preprocessing(modes: set[str], image_size: list[int] | None) -> dict[str, Any]:
    done: dict[str, Any] = {"source_modes": sorted(modes)}
    if image_size is not None:
        done.update(resize=[int(image_size[0]), int(image_size[1])], resample=RESAMPLE)
    return done


def read_folder(path: Path, image_size: list[int] | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Every PNG/JPEG under a folder (sorted by name) as 8-bit RGB (N, H, W, 3), resized to image_size
    [H, W] if given, and what was done to them (modes found, resize)."""
    files = folder_files(path)
    images: list[np.ndarray] = []
    modes: set[str] = set()
    for file in files:
        array = decode_file(file, image_size, modes)
        if images:
            _same_size(file, array, files[0], images[0].shape)
        images.append(array)
    return np.stack(images), folder_preprocessing(modes, image_size)


class FolderArray:
    """A folder's images as an array (N, H, W, 3) of 8-bit RGB decoded when read: a streamed folder source."""

    def __init__(self, files: list[Path], image_size: list[int] | None):
        self.files, self.image_size = files, image_size
        first = decode_file(files[0], image_size)
        self.shape = (len(files), *first.shape)
        self.first_shape = first.shape
        self.ndim, self.dtype = 4, np.dtype(np.uint8)
        self.modes: set[str] = set()
        self.colour: bool | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = range(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), *self.first_shape), dtype=np.uint8)
        for j, i in enumerate(rows):
            out[j] = array = decode_file(self.files[int(i)], self.image_size, self.modes)
            _same_size(self.files[int(i)], array, self.files[0], self.first_shape)
        return out


def _load_array_file(path: Path) -> Any:
    try:
        return sources.load_array_file(path)
    except sources.SourceError as exc:
        raise DataError(str(exc)) from exc


def load_source(
    spec: str,
    *,
    channels: str | int = "auto",
    image_size: list[int] | None = None,
    classes: list[int] | None = None,
    split_seed: int = 0,
    split_fractions: list[float] | None = None,
    stream: bool = False,
) -> ImageData:
    """Load a data source by its spec string (see the module docstring), with the channels asked for; with
    `stream`, .npy and uncompressed IDX files stay memory-mapped and their splits are LazyRows."""
    data = _load(spec, image_size, classes, split_seed, split_fractions or [0.8, 0.1, 0.1], stream)
    if str(channels) not in CHANNELS:
        raise DataError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
    parts = [getattr(data, name) for name in ("train", "val", "test")]
    want = (3 if any(has_colour(p) for p in parts) else 1) if str(channels) == "auto" else int(channels)
    converted = None
    for name, images in zip(("train", "val", "test"), parts):
        if isinstance(images, LazyRows):
            have = images.channels
            out, converted = images.with_channels(want), (None if have == want else "L" if want == 1 else "RGB")
        else:
            out, converted = as_channels(images, want, f"{spec} [{name}]")
        setattr(data, name, out)
    data.preprocessing.update(channels=want, convert=converted)
    return data


def _load(
    spec: str,
    image_size: list[int] | None,
    classes: list[int] | None,
    split_seed: int,
    fractions: list[float],
    stream: bool = False,
) -> ImageData:
    if spec == "digits":
        return load_digits(classes)
    if classes is not None:
        raise DataError("--classes is only supported for the digits source, which has labels")
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise DataError(f"unknown data source {spec!r}; use digits, idx:PATH, folder:PATH, npy:PATH or npz:PATH")
    path = Path(target).expanduser()
    if kind != "folder" and not path.is_file():
        raise DataError(f"{path}: no such file")
    if kind == "idx" and stream:
        base = _mapped(path, lambda: sources.read_idx(path, mmap=True))
        if isinstance(base, np.memmap):  # a gzipped file cannot be mapped: read below
            return streamed_split(base, fractions, split_seed, spec, 256)
    if kind == "npy" and stream:
        base = _mapped(path, lambda: sources.load_array_file(path, mmap=True))
        if isinstance(base, np.ndarray):
            return streamed_split(base, fractions, split_seed, spec, 256)
    if kind == "idx":
        images = check_levels(read_idx(path), 256, str(path))
        return seeded_split(images, fractions, split_seed, spec, 256)
    if image_size is not None and kind != "folder":
        raise DataError("--image-size resizes folder images only; resize arrays before saving them")
    if kind == "folder" and stream:
        folder = FolderArray(folder_files(path), image_size)
        data = streamed_split(folder, fractions, split_seed, spec, 256)  # decodes every file once
        data.preprocessing = folder_preprocessing(folder.modes, image_size)
        return data
    if kind == "folder":
        pixels, done = read_folder(path, image_size)
        data = seeded_split(check_levels(pixels, 256, str(path)), fractions, split_seed, spec, 256)
        data.preprocessing = done
        return data
    if kind == "npy":
        array = _load_array_file(path)
        if not isinstance(array, np.ndarray):
            raise DataError(f"{path}: expected a .npy array, found an archive (use npz:{path})")
        return seeded_split(check_levels(array, 256, str(path)), fractions, split_seed, spec, 256)
    if kind == "npz":
        archive = _load_array_file(path)
        if not hasattr(archive, "files"):
            raise DataError(f"{path}: expected a .npz archive")
        with archive:
            keys = set(archive.files)
            levels = int(archive["levels"]) if "levels" in keys else 256
            if not 2 <= levels <= 256:
                raise DataError(f"{path}: 'levels' must lie in [2, 256], got {levels}")
            if {"train", "val", "test"} <= keys:
                parts = [check_levels(archive[k], levels, f"{path}[{k}]") for k in ("train", "val", "test")]
                shapes = {p.shape[1:] for p in parts}
                if len(shapes) != 1:
                    raise DataError(f"{path}: train/val/test image shapes differ: {sorted(shapes)}")
                split = {"kind": "fixed", "sizes": [len(p) for p in parts]}
                return ImageData(parts[0], parts[1], parts[2], levels, spec, split)
            if "images" in keys:
                images = check_levels(archive["images"], levels, f"{path}[images]")
                return seeded_split(images, fractions, split_seed, spec, levels)
            raise DataError(f"{path}: found arrays {sorted(keys)}; expected 'train', 'val' and 'test' or one 'images'")
    raise DataError(f"unknown data source kind {kind!r} in {spec!r}; use idx, folder, npy or npz")


def _mapped(path: Path, read: Any) -> Any:
    try:
        return read()
    except sources.SourceError as exc:
        raise DataError(str(exc)) from exc


def prepare(
    spec: str,
    *,
    levels: int | None = None,
    channels: str | int = "auto",
    image_size: list[int] | None = None,
    classes: list[int] | None = None,
    split_seed: int = 0,
    split_fractions: list[float] | None = None,
    stream: bool = False,
) -> ImageData:
    """Load a source with the channels asked for (auto, 1, 3) and requantize it to `levels` if asked."""
    data = load_source(
        spec,
        channels=channels,
        image_size=image_size,
        classes=classes,
        split_seed=split_seed,
        split_fractions=split_fractions,
        stream=stream,
    )
    for name in ("train", "val", "test"):
        if len(getattr(data, name)) == 0:
            raise DataError(f"{spec}: the {name} split is empty")
    if levels is not None and levels != data.levels:
        if levels > data.levels:
            raise DataError(f"cannot requantize {data.levels} grey levels up to {levels}")
        for name in ("train", "val", "test"):
            part = getattr(data, name)
            lazy = isinstance(part, LazyRows)
            setattr(
                data, name, part.with_levels(data.levels, levels) if lazy else requantize(part, data.levels, levels)
            )
        data.split["requantized_from"] = data.levels
        data.levels = levels
    return data


def prepare_config(cfg: Any, stream: bool = False) -> ImageData:
    """The data a TrainConfig names (its dataset, levels, channels, image size, classes and split)."""
    return prepare(
        cfg.dataset,
        levels=cfg.levels,
        channels=cfg.channels,
        image_size=cfg.image_size,
        classes=cfg.classes,
        split_seed=cfg.split_seed,
        split_fractions=cfg.split_fractions,
        stream=stream,
    )
