"""`vae-score MODEL_VERSION_DIR DATA --out scores.csv`: score an archive of images offline, torch-free.

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
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
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
    anomaly_maps,
    bits_per_dim,
    raw_scores,
    requantize,
    rgb_to_grey,
    scores_from_nll,
)
from vae_contract.manifest import parse_version
from vae_contract.sources import SourceError, load_array_file, read_idx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}  # as vae-train's folder source
BASE_COLUMNS = ["index", "source", "error", "log_likelihood_nats", "nll_nats", "nll_bits_per_dim", "elbo_nats", "ess"]
DEFAULT_COLUMNS = ["score", "threshold", "p_value", "is_ood"]  # the default score at the fpr, as /score answers


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


def score_names(mv: ModelVersion) -> list[str]:
    """The scores this version can give: nll_bpd and complexity always, the others where calibrated."""
    calib = mv.manifest.get("calibration") or {}
    names = ["nll_bpd", "complexity"]
    if "typicality_center_bpd" in calib and "standardize" in calib:
        names += ["typicality", "combined"]
    return names


def columns(mv: ModelVersion) -> list[str]:
    per_score = [f"{name}{suffix}" for name in score_names(mv) for suffix in ("", "_p_value", "_is_ood")]
    return BASE_COLUMNS + DEFAULT_COLUMNS + per_score


MAP_COLUMNS = ["anomaly_map_file", "anomaly_pixels", "anomaly_map_max", "pixel_threshold"]


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
    if maps_dir is not None:
        engine, pixel_engine = mv.pixel_engine, mv.pixel_engine  # one pass, as /score with anomaly_map runs it
    else:
        engine, pixel_engine = mv.scoring.engine, None
    pixels = mv.height * mv.width
    tasks = score_direct(engine, xs, k, [seed] * len(xs), mv.latent_dim, mv.chunk, per_call, pixel_engine, pixels)
    ll = np.array([t.acc.log_likelihood()[0] for t in tasks])
    elbo = np.array([t.acc.elbo()[0] for t in tasks])
    ess = np.array([t.acc.ess()[0] for t in tasks])
    nll_bpd = bits_per_dim(-ll, mv.dim)
    calib = mv.manifest.get("calibration") or {}
    names = score_names(mv)
    if "typicality" in names:
        values = scores_from_nll(nll_bpd, xs, calib["typicality_center_bpd"], calib["standardize"])
    else:
        values = raw_scores(nll_bpd, xs)
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
        maps = anomaly_maps(expected).reshape(len(xs), mv.height, mv.width)
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
    maps = {"anomaly_maps": str(maps_dir), "anomaly_map_units": "nats"} if maps_dir is not None else {}
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
        "engine": (mv.pixel_engine if maps_dir is not None else mv.scoring.engine).info.label,
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
        "columns": columns(mv) + (MAP_COLUMNS if maps_dir is not None else []),
    }


def rows_done(out: Path, header: dict[str, Any], overwrite: bool) -> int:
    """Complete rows already in `out` for this very run (a partly written last line is cut off)."""
    meta = out.with_name(out.name + ".json")
    if overwrite or not out.exists():
        return 0
    try:
        before = json.loads(meta.read_text())
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
    raw = out.read_bytes()
    keep = raw.rfind(b"\n") + 1  # a row cut short by an interruption is dropped and scored again
    if keep < len(raw):
        with out.open("r+b") as f:
            f.truncate(keep)
    lines = raw[:keep].count(b"\n")
    return max(0, lines - 1)  # the header line


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
    """Score every image of `data` (or of its `shard` (i, n): the i-th of n contiguous parts) into `out` (CSV),
    resuming a run that stopped; return the run's header."""
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
    done = rows_done(out, header, overwrite)
    first, last = header["rows"]
    total = last - first
    if done == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(json.dumps(header, indent=1) + "\n")
        with out.open("w", newline="") as f:
            csv.writer(f).writerow(header["columns"])
    print(
        f"vae-score: {mv.key} on {mv.scoring.info.label}, K={k}, seed {seed}, fpr {fpr}: {total} images"
        + (f" (shard {shard[0]}/{shard[1]}: {first}..{last - 1} of {len(source)})" if shard[1] > 1 else "")
        + (f", {done} already scored in {out}" if done else ""),
        file=log,
    )
    bar = Progress(total, done, log, progress)
    cols = header["columns"]
    with out.open("a", newline="") as f:
        for start, stop in batches(first + done, last, batch):
            x, errors = source.read(start, stop)
            rows = score_rows(mv, x, errors, k, seed, fpr, maps_dir, start)
            text = io.StringIO()
            writer = csv.writer(text)
            for j, row in enumerate(rows):
                row.update(index=start + j, source=source.name(start + j))
                writer.writerow([_cell(row[c]) if c in row else "" for c in cols])
            f.write(text.getvalue())  # one write a batch: an interruption leaves whole batches (and at most a cut line)
            f.flush()
            bar.update(stop - start)
    return header


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-score",
        description="Score a folder or array of images with a model version, offline and torch-free, on the "
        "service's own engines: /score's numbers for every image (log-likelihood in nats, NLL in nats and "
        "bits/dim, ELBO, ESS, every calibrated OOD score with its p-value and flag), one CSV row each. Resumes "
        "an output that a stopped run left.",
    )
    p.add_argument("model", type=Path, help="model version directory, e.g. models/digits/1")
    p.add_argument(
        "data",
        help="idx:PATH, npy:PATH, npz:PATH (array 'images', else 'test'), folder:PATH (PNG/JPEG, decoded as "
        "uploads are), or a bare path",
    )
    p.add_argument("--out", type=Path, required=True, help="CSV file of scores (its run header goes to OUT.json)")
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
        "with its flagged pixels, maximum and pixel threshold in the CSV",
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
        print(
            f"vae-score: interrupted; the rows written so far stay in {args.out}: run again to go on", file=sys.stderr
        )
        return 130
    print(f"vae-score: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
