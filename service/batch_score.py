"""`vae-score MODEL_VERSION_DIR DATA --out scores.csv|scores.parquet`: score an archive of images offline, torch-free.

The numbers are /score's: the version is loaded and checked as the service loads it (manifest digest, file
hashes, warm-up, the export's check scores), scored on the engine the service would choose on this machine
(OpenVINO bf16 where the CPU has bf16 and the parity check passes, else onnxruntime fp32) with the one
scoring algorithm (`service.scoring.score_direct`: each image's noise from the seed, so its numbers do not
depend on its neighbours), and the scores, p-values and OOD flags come from `vae_contract.formulas` with the
manifest's calibration. Every calibrated score is written, not only the default one.

DATA is a spec string as for `vae-train` (idx:PATH, npy:PATH, npz:PATH, folder:PATH) or a bare path (a
folder, or a file named *.npy, *.npz or else IDX). Arrays hold integer levels of `--levels` levels (256
unless an .npz says otherwise) and are requantized and converted to the model's levels and channels as
training converts them; folder files are decoded exactly as /score/upload decodes uploads (a file that
cannot be decoded gets a row with its error, not a crash). Arrays are memory-mapped where the file allows
it (.npy, uncompressed IDX) and read a batch at a time.

Resumable: rows are appended and flushed a batch at a time; a run that finds its output already holding
rows for the same model, data and settings (`<out>.json` says which) skips them and goes on.

The output is CSV, or Parquet where --out ends in .parquet (pyarrow, the 'parquet' extra: not in the serving
image), with the same columns, values and types (`columns`). A Parquet file cannot be appended to, so there the
flushed batches are part files of a folder beside it, combined into the file when every row is written
(`ParquetRows` says why that design).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from service.core import DEFAULT_FPR
from service.errors import InvalidInput
from service.images import ImageFormat, decode_image_bytes
from service.repository import ModelLoadError, ModelVersion, load_version
from service.scoring import score_direct
from service.settings import Settings
from vae_contract.formulas import (
    ScoreCalibration,
    bits_per_dim,
    elbo_gap_bits_per_dim,
    llr_bits_per_dim,
    requantize,
    rgb_to_grey,
)
from vae_contract.manifest import parse_version
from vae_contract.sources import SourceError, load_array_file, read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}  # as vae-train's folder source
# The output's columns in order, each with its type (an Arrow type name): the one definition of the CSV's header
# line and of the Parquet schema. A value a row lacks (an image that did not decode) is an empty CSV cell and a
# Parquet null.
BASE_COLUMNS = {
    "index": "int64",
    "source": "string",
    "error": "string",  # empty when the image decoded
    "log_likelihood_nats": "float64",
    "nll_nats": "float64",
    "nll_bits_per_dim": "float64",
    "elbo_nats": "float64",
    "ess": "float64",
}
DEFAULT_COLUMNS = {"score": "float64", "threshold": "float64", "p_value": "float64", "is_ood": "bool"}  # as /score
SCORE_COLUMNS = {"": "float64", "_p_value": "float64", "_is_ood": "bool"}  # each calibrated score's, after its name
MAP_COLUMNS = {
    "anomaly_map_file": "string",
    "anomaly_pixels": "int64",
    "anomaly_map_max": "float64",
    "pixel_threshold": "float64",
}
PARQUET_ROW_GROUP = 65536  # rows a row group of the combined Parquet file


class ScoreError(RuntimeError):
    """Something vae-score cannot do: a bad source, a version that does not load, an output it would clobber."""


# --- sources -------------------------------------------------------------------------------------


@dataclass
class Source:
    """N images, read in slices as (B, D) int64 levels of the model (or an error per image for files)."""

    spec: str
    names: list[str] | None  # file paths under `root` of a folder; None for arrays (the row index names the image)
    array: np.ndarray | None  # (N, H, W[, C]) integer levels of `levels`, possibly memory-mapped
    levels: int
    fmt: ImageFormat
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.names) if self.names is not None else len(self.array)  # type: ignore[arg-type]

    def name(self, i: int) -> str:
        return self.names[i] if self.names is not None else str(i)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[str | None]]:
        """Images start..stop as (B, D) int64 model levels, and each one's error (None when it decoded)."""
        fmt = self.fmt
        if self.names is not None:
            rows = np.zeros((stop - start, fmt.dim), dtype=np.int64)
            errors: list[str | None] = []
            for j, name in enumerate(self.names[start:stop]):
                try:
                    assert self.root is not None
                    rows[j] = decode_image_bytes((self.root / name).read_bytes(), fmt, name)
                    errors.append(None)
                except InvalidInput as exc:
                    errors.append(exc.message)
                except OSError as exc:
                    errors.append(f"cannot read: {exc.strerror or exc}")
            return rows, errors
        assert self.array is not None
        x = np.asarray(self.array[start:stop])
        if x.ndim == 3:
            x = x[..., None]
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi >= self.levels:
            raise ScoreError(
                f"{self.spec}: images {start}..{stop - 1} hold values in [{lo}, {hi}], outside the source's "
                f"{self.levels} levels (--levels)"
            )
        if x.shape[3] != fmt.channels:
            x = rgb_to_grey(x)[..., None] if fmt.channels == 1 else np.repeat(x, 3, axis=3)
        if self.levels != fmt.levels:
            x = requantize(x, self.levels, fmt.levels)
        return x.reshape(len(x), -1).astype(np.int64), [None] * len(x)


def open_source(spec: str, fmt: ImageFormat, levels: int | None = None) -> Source:
    """The images a DATA argument names, checked against the model's image format."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in ("idx", "npy", "npz", "folder"):
        path = Path(spec)
        kind = "folder" if path.is_dir() else {".npy": "npy", ".npz": "npz"}.get(path.suffix.lower(), "idx")
        target = spec
    path = Path(target).expanduser()
    if kind == "folder":
        if not path.is_dir():
            raise ScoreError(f"{path}: not a folder")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ScoreError(f"{path}: holds no PNG or JPEG files")
        return Source(spec, [str(p.relative_to(path)) for p in files], None, 256, fmt, path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    try:
        if kind == "idx":
            array, source_levels = read_idx(path, mmap=True), 256
        elif kind == "npy":
            array, source_levels = load_array_file(path, mmap=True), 256
            if not isinstance(array, np.ndarray):
                raise ScoreError(f"{path}: expected a .npy array, found an archive (use npz:{path})")
        else:
            archive = load_array_file(path)
            if not hasattr(archive, "files"):
                raise ScoreError(f"{path}: expected a .npz archive")
            keys = [k for k in ("images", "test", "val", "train") if k in archive.files]
            if not keys:
                raise ScoreError(f"{path}: found arrays {sorted(archive.files)}; expected 'images' (or 'test')")
            array = archive[keys[0]]
            source_levels = int(archive["levels"]) if "levels" in archive.files else 256
    except SourceError as exc:
        raise ScoreError(str(exc)) from exc
    source_levels = levels or source_levels
    if not np.issubdtype(array.dtype, np.integer):
        raise ScoreError(f"{path}: dtype {array.dtype} is not an integer type; store levels as integers (uint8)")
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3)):
        raise ScoreError(f"{path}: expected images (N, H, W) or (N, H, W, C) with C 1 or 3, got {array.shape}")
    if tuple(array.shape[1:3]) != (fmt.height, fmt.width):
        raise ScoreError(
            f"{path}: images are {array.shape[1]}x{array.shape[2]} (HxW); the model takes {fmt.describe()}"
        )
    if source_levels < fmt.levels:
        raise ScoreError(f"{path}: {source_levels} levels cannot be requantized up to the model's {fmt.levels}")
    return Source(spec, None, array, source_levels, fmt)


# --- scoring -------------------------------------------------------------------------------------


def load_model(version_dir: Path, settings: Settings) -> ModelVersion:
    version = parse_version(version_dir.name)
    if version is None:
        raise ScoreError(f"{version_dir}: a model version directory ends in its number (models/<name>/<version>)")
    try:
        return load_version(version_dir, settings, version_dir.parent.name, version)
    except ModelLoadError as exc:
        raise ScoreError(f"{version_dir}: cannot load the model version: {exc}") from exc


def columns(mv: ModelVersion, maps: bool = False) -> dict[str, str]:
    """The output's columns, in order, each with its Arrow type name (the anomaly map's with `maps`)."""
    per_score = {f"{name}{suffix}": kind for name in mv.score_names for suffix, kind in SCORE_COLUMNS.items()}
    return {**BASE_COLUMNS, **DEFAULT_COLUMNS, **per_score, **(MAP_COLUMNS if maps else {})}


def score_rows(
    mv: ModelVersion,
    x: np.ndarray,
    errors: list[str | None],
    k: int,
    seed: int,
    fpr: float,
    maps_dir: Path | None = None,
    first_index: int = 0,
) -> list[dict[str, Any]]:
    """One row of numbers per image, as /score computes them (and every calibrated score besides). With
    `maps_dir`, each image's anomaly map as /score's `anomaly_map` gives it (nats, from the same samples)
    goes to maps_dir/<index>.npy (float32, H x W), and the row gets its file, its pixels above the
    calibrated pixel threshold at `fpr`, its maximum and the threshold."""
    ok = [i for i, e in enumerate(errors) if e is None]
    rows: list[dict[str, Any]] = [{"error": e or ""} for e in errors]
    if not ok:
        return rows
    xs = x[ok]
    # images a call, as the service's scheduler packs them: a call's rows budget over the chunk's length
    per_call = max(1, mv.score_call_rows // min(k, mv.chunk))
    # the engines /score runs: maps in the same pass as the score, LLR>k on the fp32 reference (`score_engine`)
    pixel_engine = mv.pixel_engine if maps_dir is not None else None
    names = mv.score_names
    llr_engine = mv.ref if "llr" in names else None
    pixels = mv.height * mv.width
    tasks = score_direct(
        mv.scoring.engine, xs, k, [seed] * len(xs), mv.noise_dim, mv.chunk, per_call, pixel_engine, pixels, llr_engine
    )
    ll = np.array([t.acc.log_likelihood()[0] for t in tasks])
    elbo = np.array([t.acc.elbo()[0] for t in tasks])
    ess = np.array([t.acc.ess()[0] for t in tasks])
    nll_bpd = bits_per_dim(-ll, mv.dim)
    calib = mv.manifest.get("calibration") or {}
    llr_bpd = None
    if llr_engine is not None:
        ll_k = np.array([t.llr.log_likelihood()[0] for t in tasks if t.llr is not None])
        llr_bpd = llr_bits_per_dim(ll, ll_k, mv.dim)
    values = mv.score_values(nll_bpd, xs, llr_bpd, elbo_gap_bits_per_dim(ll, elbo, mv.dim))
    table: dict[str, Any] = {
        "log_likelihood_nats": ll,
        "nll_nats": -ll,
        "nll_bits_per_dim": nll_bpd,
        "elbo_nats": elbo,
        "ess": ess,
    }
    for name in names:
        table[name] = values[name]
        cal = mv.calibrations.get(name)
        if cal is not None:
            table[f"{name}_p_value"] = cal.p_values(values[name])
            table[f"{name}_is_ood"] = values[name] > cal.threshold(fpr)
    default = calib.get("default_score", "nll_bpd")
    cal = mv.calibrations.get(default)
    table["score"] = values[default]
    if cal is not None:
        table["threshold"] = np.full(len(xs), cal.threshold(fpr))
        table["p_value"], table["is_ood"] = table[f"{default}_p_value"], table[f"{default}_is_ood"]
    if maps_dir is not None:
        cut = ScoreCalibration.from_block("anomaly_map", calib["anomaly_map"]).threshold(fpr)
        expected = np.concatenate([t.pixels.expected_nll() for t in tasks if t.pixels is not None])
        maps = mv.anomaly_maps(expected, xs, mv.map_means(expected, xs))
        names = []
        for j, i in enumerate(ok):
            name = f"{first_index + i}.npy"
            np.save(maps_dir / name, maps[j].astype(np.float32))
            names.append(name)
        table["anomaly_map_file"] = names
        table["anomaly_pixels"] = (maps > cut).sum(axis=(1, 2))
        table["anomaly_map_max"] = maps.max(axis=(1, 2))
        table["pixel_threshold"] = np.full(len(xs), cut)
    for j, i in enumerate(ok):
        rows[i].update({key: column[j] for key, column in table.items()})
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # the shortest text that reads back as the same float64
    return str(value)


# --- output and resumption -----------------------------------------------------------------------


def shard_range(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Images [start, stop) of shard i of m: contiguous, sizes differing by at most one, in order."""
    i, m = shard
    return i * n // m, (i + 1) * n // m


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" (0 <= I < N) -> (I, N)."""
    try:
        i, m = (int(part) for part in text.split("/"))
    except ValueError:
        raise ScoreError(f"--shard takes I/N (this process's shard I of N, from 0), got {text!r}") from None
    if not 0 <= i < m:
        raise ScoreError(f"--shard {text}: needs 0 <= I < N")
    return i, m


def run_header(
    mv: ModelVersion,
    source: Source,
    k: int,
    seed: int,
    fpr: float,
    shard: tuple[int, int] = (0, 1),
    maps_dir: Path | None = None,
) -> dict[str, Any]:
    """What the rows of an output depend on; a run resumes an output only when they are all the same."""
    calib = mv.manifest.get("calibration") or {}
    maps = {"anomaly_maps": str(maps_dir), "anomaly_map_units": mv.map_block["units"]} if maps_dir is not None else {}
    return {
        "model": mv.name,
        "version": mv.version,
        "digest": mv.digest,
        "data": source.spec,
        "images": len(source),
        "shard": f"{shard[0]}/{shard[1]}",
        "rows": list(shard_range(len(source), shard)),
        "source_levels": source.levels,
        "num_samples": k,
        "seed": seed,
        "fpr": fpr,
        "engine": mv.score_engine(maps_dir is not None, "llr" in mv.score_names).info.label,
        "chunk": mv.chunk,
        **maps,
        "default_score": calib.get("default_score", "nll_bpd"),
        "score_units": {
            "nll": "nats and bits/dim",
            "nll_bpd": "bits/dim",
            "complexity": "bits/dim",
            "typicality": "bits/dim",
            "combined": "std units",
        },  # fmt: skip
        "columns": list(columns(mv, maps_dir is not None)),
    }


def check_same_run(out: Path, header: dict[str, Any]) -> None:
    """Refuse to go on with an output that `<out>.json` says another run (or no run of vae-score) wrote."""
    try:
        before = json.loads(out.with_name(out.name + ".json").read_text())
    except (OSError, json.JSONDecodeError):
        before = None
    if before != header:
        changed = (
            sorted(k for k in header if before.get(k) != header[k]) if isinstance(before, dict) else ["(no header)"]
        )
        raise ScoreError(
            f"{out} holds the scores of another run (differs in: {', '.join(changed)}); pass --overwrite to "
            "replace it, or another --out"
        )


class CsvRows:
    """The CSV output: a header line, then each batch's rows appended in one write and flushed. Resuming counts
    the complete lines (a line cut short by an interruption is cut off and its image scored again)."""

    def __init__(self, out: Path, types: dict[str, str]):
        self.out, self.cols = out, list(types)
        self.file: TextIO | None = None

    def exists(self) -> bool:
        return self.out.exists()

    def rows_done(self, first: int) -> int:
        raw = self.out.read_bytes()
        keep = raw.rfind(b"\n") + 1  # a row cut short by an interruption is dropped and scored again
        if keep < len(raw):
            with self.out.open("r+b") as f:
                f.truncate(keep)
        return max(0, raw[:keep].count(b"\n") - 1)  # the header line

    def start(self) -> None:
        with self.out.open("w", newline="") as f:
            csv.writer(f).writerow(self.cols)

    def write(self, start: int, rows: list[dict[str, Any]]) -> None:
        if self.file is None:
            self.file = self.out.open("a", newline="")
        text = io.StringIO()
        writer = csv.writer(text)
        for row in rows:
            writer.writerow([_cell(row[c]) if c in row else "" for c in self.cols])
        self.file.write(text.getvalue())  # one write a batch: an interruption leaves whole batches (and a cut line)
        self.file.flush()

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def pending(self) -> Path:
        return self.out


def _pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or a ScoreError that says what to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ScoreError(
            f"a .parquet --out needs pyarrow, which is not installed ({exc}): pip install pyarrow (or the project's "
            "'parquet' extra: pip install 'vae-serve[parquet]'), or write a .csv"
        ) from None
    return pa, pq


def _value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class ParquetRows:
    """The Parquet output. A Parquet file cannot be appended to (its footer, which locates the row groups, comes
    last), so each batch's rows go to a part file of their own, `<out>.parts/<first row's index>.parquet`, written
    under a temporary name and renamed: a part is whole or absent, whatever interrupts the run. Resuming counts the
    rows of the parts that follow on from the run's first row (the part files' footers; a stray temporary file or a
    part after a gap goes). When every row is written the parts are combined, in order and in row groups of
    PARQUET_ROW_GROUP rows, into `<out>` (again under a temporary name, then renamed) and the parts go; an
    existing `<out>` is therefore always complete. Chosen over one open ParquetWriter (an interrupted run leaves a
    file without a footer, none of its rows readable) and over rewriting the whole file at every batch (quadratic):
    the parts are the CSV's flushed batches, and the columns and their types are the CSV's (`columns`)."""

    def __init__(self, out: Path, types: dict[str, str]):
        self.pa, self.pq = _pyarrow()
        self.out = out
        self.parts = out.with_name(out.name + ".parts")
        self.schema = self.pa.schema([(name, self.pa.type_for_alias(kind)) for name, kind in types.items()])

    def exists(self) -> bool:
        return self.out.exists() or self.parts.exists()

    def rows_done(self, first: int) -> int:
        if self.out.exists():  # combined: every row is there (a leftover parts folder is from after the rename)
            shutil.rmtree(self.parts, ignore_errors=True)
            return int(self.pq.read_metadata(self.out).num_rows)
        if not self.parts.is_dir():
            return 0
        done = 0
        for path in sorted(self.parts.iterdir()):
            try:
                whole = path.suffix == ".parquet" and int(path.stem) == first + done
                rows = int(self.pq.read_metadata(path).num_rows) if whole else 0
            except (ValueError, OSError, self.pa.ArrowException):
                whole = False
            if whole:
                done += rows
            else:  # a temporary file an interruption left, or parts that no longer follow on: scored again
                path.unlink()
        return done

    def start(self) -> None:
        self.out.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts.mkdir(parents=True)

    def write(self, start: int, rows: list[dict[str, Any]]) -> None:
        table = self.pa.table(
            [self.pa.array([_value(row.get(f.name)) for row in rows], type=f.type) for f in self.schema],
            schema=self.schema,
        )
        part = self.parts / f"{start:012d}.parquet"
        tmp = part.with_suffix(".tmp")
        self.pq.write_table(table, tmp)
        os.replace(tmp, part)

    def finish(self) -> None:
        if not self.parts.is_dir():
            return  # combined by the run that wrote the rows
        tmp = self.out.with_name(self.out.name + ".tmp")
        with self.pq.ParquetWriter(tmp, self.schema) as writer:
            tables, rows, wrote = [], 0, False
            for path in sorted(self.parts.glob("*.parquet")):
                tables.append(self.pq.read_table(path))
                rows += tables[-1].num_rows
                if rows >= PARQUET_ROW_GROUP:
                    writer.write_table(self.pa.concat_tables(tables).combine_chunks(), PARQUET_ROW_GROUP)
                    tables, rows, wrote = [], 0, True
            if tables or not wrote:  # an empty shard still gets a file, with the columns
                writer.write_table(self.pa.concat_tables(tables or [self.schema.empty_table()]).combine_chunks())
        os.replace(tmp, self.out)
        shutil.rmtree(self.parts)

    def close(self) -> None:
        pass

    def pending(self) -> Path:
        return self.out if self.out.exists() else self.parts


class Progress:
    """images done / total, images/s and the time left, on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, done: int, stream: TextIO, enabled: bool):
        self.total, self.done, self.start_done = total, done, done
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and stream.isatty()
        self.t0 = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < (0.5 if self.tty else 10.0) and self.done < self.total):
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        line = (
            f"scoring: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f}%), "
            f"{rate:.1f} images/s, {left:.0f} s left"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def batches(start: int, total: int, size: int) -> Iterator[tuple[int, int]]:
    for i in range(start, total, size):
        yield i, min(i + size, total)


def score_to_csv(
    version_dir: Path,
    data: str,
    out: Path,
    *,
    k: int = 1000,
    seed: int = 0,
    fpr: float | None = None,
    levels: int | None = None,
    batch: int = 64,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    settings: Settings | None = None,
    progress: bool = True,
    log: TextIO = sys.stderr,
    maps_dir: Path | None = None,
) -> dict[str, Any]:
    """Score every image of `data` (or of its `shard` (i, n): the i-th of n contiguous parts) into `out` (CSV, or
    Parquet where its name ends in .parquet), resuming a run that stopped; return the run's header."""
    parquet = out.suffix.lower() == ".parquet"
    if parquet:
        _pyarrow()  # before anything is loaded or scored
    settings = settings or Settings(models_dir=version_dir.parent.parent)
    if not 1 <= k <= settings.max_k:
        raise ScoreError(f"--num-samples {k} must lie in [1, {settings.max_k}] (the service's max K)")
    if fpr is not None and not 0 < fpr < 1:
        raise ScoreError("--fpr must lie strictly between 0 and 1")
    mv = load_model(version_dir, settings)
    source = open_source(data, mv.image_format, levels)
    calib = mv.manifest.get("calibration") or {}
    fpr = fpr if fpr is not None else float(calib.get("default_fpr", DEFAULT_FPR))
    if maps_dir is not None:
        if not mv.has_anomaly_maps:
            raise ScoreError(f"{mv.key} has no anomaly maps (exported before them): re-export it with vae-export")
        maps_dir.mkdir(parents=True, exist_ok=True)
    header = run_header(mv, source, k, seed, fpr, shard, maps_dir)
    sink = (ParquetRows if parquet else CsvRows)(out, columns(mv, maps_dir is not None))
    first, last = header["rows"]
    done = 0
    if sink.exists() and not overwrite:
        check_same_run(out, header)
        done = sink.rows_done(first)
    total = last - first
    if done == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(json.dumps(header, indent=1) + "\n")
        sink.start()
    print(
        f"vae-score: {mv.key} on {mv.scoring.info.label}, K={k}, seed {seed}, fpr {fpr}: {total} images"
        + (f" (shard {shard[0]}/{shard[1]}: {first}..{last - 1} of {len(source)})" if shard[1] > 1 else "")
        + (f", {done} already scored in {sink.pending()}" if done else ""),
        file=log,
    )
    bar = Progress(total, done, log, progress)
    try:
        for start, stop in batches(first + done, last, batch):
            x, errors = source.read(start, stop)
            rows = score_rows(mv, x, errors, k, seed, fpr, maps_dir, start)
            for j, row in enumerate(rows):
                row.update(index=start + j, source=source.name(start + j))
            sink.write(start, rows)
            bar.update(stop - start)
        sink.finish()
    finally:
        sink.close()
    return header


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-score",
        description="Score a folder or array of images with a model version, offline and torch-free, on the "
        "service's own engines: /score's numbers for every image (log-likelihood in nats, NLL in nats and "
        "bits/dim, ELBO, ESS, every calibrated OOD score with its p-value and flag), one CSV (or Parquet) row "
        "each. Resumes an output that a stopped run left.",
    )
    p.add_argument("model", type=Path, help="model version directory, e.g. models/digits/1")
    p.add_argument(
        "data",
        help="idx:PATH, npy:PATH, npz:PATH (array 'images', else 'test'), folder:PATH (PNG/JPEG, decoded as "
        "uploads are), or a bare path",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="file of scores: CSV, or Parquet where it ends in .parquet (needs pyarrow); the run's header goes to "
        "OUT.json",
    )
    p.add_argument("--num-samples", "-k", type=int, default=1000, help="importance samples K (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the importance samples, as /score's (default: 0)")
    p.add_argument(
        "--fpr", type=float, default=None, help="false-positive rate of the OOD flags (default: the model's)"
    )
    p.add_argument(
        "--levels", type=int, default=None, help="levels of an array source (default: 256, or the .npz's 'levels')"
    )
    p.add_argument("--batch", type=int, default=64, help="images scored and written at a time (default: 64)")
    p.add_argument(
        "--engine",
        choices=("auto", "onnxruntime", "openvino"),
        default=None,
        help="scoring engine, as the service's VAE_ENGINE (default: auto, the service's choice on this machine)",
    )
    p.add_argument("--threads", type=int, default=None, help="threads of the engine (default: the CPUs available)")
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="score only part I of N (from 0) of the images, contiguous, with their global index: one process of "
        "several on a machine, or one Kubernetes Indexed Job pod (--shard $(JOB_COMPLETION_INDEX)/N) (default: 0/1)",
    )
    p.add_argument(
        "--maps",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each image's anomaly map (as /score's anomaly_map: nats, H x W, float32) to DIR/<index>.npy, "
        "with its flagged pixels, maximum and pixel threshold in the output",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output of another run instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {"models_dir": args.model.parent.parent}
    if args.engine is not None:
        overrides["engine"] = args.engine
    if args.threads is not None:
        overrides["intra_op_threads"] = args.threads
    if args.batch < 1:
        print("vae-score: error: --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = Settings(**overrides)
        score_to_csv(
            args.model,
            args.data,
            args.out,
            k=args.num_samples,
            seed=args.seed,
            fpr=args.fpr,
            levels=args.levels,
            batch=args.batch,
            overwrite=args.overwrite,
            shard=parse_shard(args.shard),
            settings=settings,
            progress=not args.quiet,
            maps_dir=args.maps,
        )
    except ScoreError as exc:
        print(f"vae-score: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = args.out.with_name(args.out.name + ".parts") if args.out.suffix.lower() == ".parquet" else args.out
        print(f"vae-score: interrupted; the rows written so far stay in {kept}: run again to go on", file=sys.stderr)
        return 130
    print(f"vae-score: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
