"""The protocol-neutral inference core: checks, limits, admission, batching and scoring, once.

Both protocols (the JSON API in service/routes, the Open Inference Protocol in service/v2) parse
their input into arrays, call one method here and shape the result. Everything below raises domain
errors (service/errors.py); no HTTP status is chosen here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batching import Job, RowsJob, Scheduler, ScoreJob
from service.errors import Cancelled, DeadlineExceeded, InvalidInput
from service.metrics import Metrics
from service.repository import ModelRepository, ModelVersion
from service.scoring import ImageTask
from service.settings import Settings
from vae_contract.formulas import (
    DECODE_MODES,
    MAX_SEED,
    SCORE_NAMES,
    SCORE_UNITS,
    ImportanceAccumulator,
    PixelNllAccumulator,
    ScoreCalibration,
    bits_per_dim,
    elbo_gap_bits_per_dim,
    expected_values,
    images_from_probs,
    llr_bits_per_dim,
    needs_llr,
)

DEFAULT_FPR = 0.01
MAX_PROBS_NUMBERS = 4_000_000  # per-level probabilities one response may carry (mode=probs)
#: A request whose work is not done after this long starts watching for its client to hang up (and so
#: stops queued work when it does); shorter ones finish before that would matter.
WATCH_DISCONNECT_AFTER_S = 0.05


@dataclass
class RequestContext:
    """A request's deadline and, when the protocol can tell, a way to learn that the client went away."""

    deadline: float  # time.monotonic()
    timeout_s: float
    disconnected: Callable[[], Awaitable[None]] | None = None  # completes when the client disconnects

    @classmethod
    def start(cls, settings: Settings, timeout_s: float | None, disconnected=None) -> RequestContext:
        # The lower bound is the protocol's (the JSON API's schema asks for 1 s or more), the upper the server's.
        if timeout_s is not None:
            if not 0 < timeout_s:
                raise InvalidInput("timeout_s must be positive", "timeout_s")
            if timeout_s > settings.request_timeout_s:
                limit = settings.request_timeout_s
                raise InvalidInput(f"timeout_s may be at most {limit:g} s (the server's limit)", "timeout_s")
        timeout = timeout_s or settings.request_timeout_s
        return cls(time.monotonic() + timeout, timeout, disconnected)


@dataclass
class EncodeResult:
    mv: ModelVersion
    mu: np.ndarray  # (B, L)
    log_var: np.ndarray  # (B, L)


@dataclass
class DecodeResult:
    mv: ModelVersion
    images: np.ndarray  # (B, D) int64
    probs: np.ndarray | None  # (B, D, levels) when asked for
    z: np.ndarray | None = None  # the latents, for /sample


@dataclass
class MapResult:
    """Anomaly maps of the scored images (models/README.md, calibration.anomaly_map)."""

    maps: np.ndarray  # (B, H, W) in `units`, higher = more anomalous (calibration.anomaly_map's definition)
    threshold: float  # a pixel above it is flagged: the validation pixels' 1 - fpr quantile
    fpr: float
    units: str

    @property
    def masks(self) -> np.ndarray:
        return self.maps > self.threshold


@dataclass
class ScoreResult:
    mv: ModelVersion
    k: int
    seed: int
    engine: str
    log_likelihood: np.ndarray  # (B,) nats
    elbo: np.ndarray  # (B,) nats
    ess: np.ndarray  # (B,)
    score_name: str
    score_units: str
    score: np.ndarray  # (B,)
    fpr: float | None
    threshold: float | None
    p_value: np.ndarray | None
    is_ood: np.ndarray | None
    maps: MapResult | None = None

    @property
    def nll_bpd(self) -> np.ndarray:
        return bits_per_dim(-self.log_likelihood, self.mv.dim)


class InferenceCore:
    def __init__(self, settings: Settings, repository: ModelRepository, scheduler: Scheduler, metrics: Metrics):
        self.settings, self.repository, self.scheduler, self.metrics = settings, repository, scheduler, metrics

    # --- lookups and checks -------------------------------------------------------------------
    def model(self, name: str | None, version: int | None) -> ModelVersion:
        return self.repository.get(name, version)

    def check_count(self, n: int, where: str) -> None:
        if n < 1:
            raise InvalidInput("at least one item is needed", where)
        if n > self.settings.max_batch:
            raise InvalidInput(
                f"{n} items exceed the limit of {self.settings.max_batch} per request", where, code="batch_too_large"
            )

    def check_images(self, mv: ModelVersion, x: np.ndarray, where: str = "images") -> np.ndarray:
        """Images (B, D), (B, H, W) (grey) or (B, H, W, C) of integer levels in [0, levels) -> (B, D) int64."""
        x = np.asarray(x)
        self.check_count(len(x) if x.ndim else 0, where)
        shapes = {(mv.dim,), mv.image_shape, (mv.height, mv.width, mv.channels)}
        if x.shape[1:] not in shapes:
            expected = " or ".join(str([-1, *s]).replace("-1", "N") for s in sorted(shapes, key=len))
            raise InvalidInput(f"images have shape {list(x.shape)}; expected {expected}", where, code="wrong_shape")
        if x.dtype.kind not in "iu":
            raise InvalidInput(f"pixel values must be integers, got {x.dtype}", where, code="invalid_value")
        rows = np.ascontiguousarray(x.reshape(len(x), mv.dim), dtype=np.int64)
        # one pass for both ends: viewed as unsigned, a negative value (or a uint64 past int64) exceeds every level
        if int(np.maximum.reduce(rows.view(np.uint64), axis=None)) >= mv.levels:
            lo, hi = int(x.min()), int(x.max())
            bad = int(np.argwhere((x.reshape(len(x), -1) < 0) | (x.reshape(len(x), -1) >= mv.levels))[0][0])
            raise InvalidInput(
                f"pixel values range over [{lo}, {hi}]; this model takes levels 0..{mv.levels - 1}",
                f"{where}[{bad}]",
                code="out_of_range",
            )
        return rows

    def check_latents(self, mv: ModelVersion, z: np.ndarray, where: str = "z") -> np.ndarray:
        z = np.asarray(z)
        self.check_count(len(z) if z.ndim else 0, where)
        if z.ndim != 2 or z.shape[1] != mv.latent_dim:
            raise InvalidInput(
                f"latents have shape {list(z.shape)}; this model's are [N, {mv.latent_dim}]", where, code="wrong_shape"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, refused below
            z32 = np.asarray(z, dtype=np.float64).astype(np.float32)
        bad = ~np.isfinite(z32)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise InvalidInput(
                "latents must be finite numbers within float32 range", f"{where}[{i}][{j}]", code="non_finite"
            )
        return np.ascontiguousarray(z32)

    def check_seed(self, seed: int, where: str = "seed") -> int:
        if not 0 <= seed <= MAX_SEED:
            raise InvalidInput(f"seed must lie in [0, {MAX_SEED}]", where)
        return seed

    def check_mode(self, mode: str, where: str = "mode") -> str:
        if mode not in DECODE_MODES + ("probs",):
            raise InvalidInput(f"mode must be one of {list(DECODE_MODES) + ['probs']}, got {mode!r}", where)
        return mode

    def check_score_request(
        self, mv: ModelVersion, n: int, k: int, score: str | None, fpr: float | None
    ) -> tuple[str, float | None]:
        if not 1 <= k <= self.settings.max_k:
            raise InvalidInput(
                f"num_samples {k} must lie in [1, {self.settings.max_k}]", "num_samples", code="k_too_large"
            )
        if n * k > self.settings.max_request_samples:
            raise InvalidInput(
                f"{n} images x K={k} = {n * k} importance samples exceed the limit of "
                f"{self.settings.max_request_samples} per request; send fewer images or a smaller K",
                "num_samples",
                code="too_much_work",
            )
        calib = mv.manifest.get("calibration") or {}
        name = score if score is not None else calib.get("default_score", "nll_bpd")
        if name not in SCORE_NAMES:
            raise InvalidInput(
                f"unknown score {name!r}; choose one of {list(SCORE_NAMES)}", "score", code="unknown_score"
            )
        if name not in mv.score_names:
            raise InvalidInput(
                f"model {mv.key} has no calibration for score {name!r} (calibrated: {sorted(mv.calibrations)})",
                "score",
                code="uncalibrated_score",
            )
        if fpr is not None and not 0 < fpr < 1:
            raise InvalidInput("fpr must lie strictly between 0 and 1", "fpr")
        return name, fpr

    def check_map_request(self, mv: ModelVersion) -> dict[str, Any]:
        """The version's anomaly-map calibration; InvalidInput when it was exported without one."""
        if not mv.has_anomaly_maps:
            raise InvalidInput(
                f"model {mv.key} was exported before anomaly maps (no pixel_log_weights graph or no anomaly_map "
                "calibration): re-export it with vae-export (which calibrates the maps when its training data can "
                "be read) or re-train it; scores without anomaly_map still work",
                "anomaly_map",
                code="no_anomaly_map",
            )
        return dict(mv.manifest["calibration"]["anomaly_map"])

    # --- running jobs -------------------------------------------------------------------------
    async def _run(self, job: Job, ctx: RequestContext) -> Any:
        """Submit the job and wait for its result, its deadline, or (when the protocol can tell) the client
        going away: past the deadline DeadlineExceeded, client gone Cancelled; either way the worker drops
        the job's remaining work within one engine call.

        Timers rather than asyncio.wait over tasks: this wait is on every request's path, and a short one
        (most of them) never starts the disconnect watcher, a task of its own (README Performance)."""
        self.scheduler.submit(job)
        loop = asyncio.get_running_loop()
        future = job.future
        watcher: asyncio.Future | None = None

        def stop(reason: str, error: Exception) -> None:
            if not future.done():
                job.cancelled = reason
                future.set_exception(error)

        def expire() -> None:
            stop("deadline", self._deadline_error(ctx))

        def client_gone(w: asyncio.Future) -> None:
            if not w.cancelled() and w.exception() is None:
                stop("client", Cancelled("the client went away"))

        def watch() -> None:
            nonlocal watcher
            if not future.done() and ctx.disconnected is not None:
                watcher = asyncio.ensure_future(ctx.disconnected())
                watcher.add_done_callback(client_gone)

        timers = [loop.call_later(max(0.0, ctx.deadline - time.monotonic()), expire)]
        if ctx.disconnected is not None:
            timers.append(loop.call_later(WATCH_DISCONNECT_AFTER_S, watch))
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and job.cancelled and not (task and task.cancelling()):
                # The worker dropped the job when it saw the deadline pass, and cancelled the future a
                # moment before this side's own timer ran (a client gone settles the future here, first).
                raise self._deadline_error(ctx) from None
            job.cancelled = "client"  # this request was cancelled: the work is nobody's any more
            raise
        finally:
            for timer in timers:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()

    @staticmethod
    def _deadline_error(ctx: RequestContext) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the work was not done within the request's deadline of {ctx.timeout_s:g} s; it was stopped "
            "(send less work, or a larger timeout_s up to the server's limit)",
            "timeout_s",
        )

    def _job(self, cls: type, op: str, mv: ModelVersion, work: int, ctx: RequestContext, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return cls(op=op, mv=mv, work=work, deadline=ctx.deadline, loop=loop, future=loop.create_future(), **kw)

    # --- operations ---------------------------------------------------------------------------
    async def encode(self, mv: ModelVersion, x: np.ndarray, ctx: RequestContext) -> EncodeResult:
        job = self._job(RowsJob, "encode", mv, len(x), ctx, inputs=x)
        mu, log_var = await self._run(job, ctx)
        return EncodeResult(mv, mu, log_var)

    async def decode(
        self, mv: ModelVersion, z: np.ndarray, mode: str, seed: int, ctx: RequestContext, with_probs: bool = False
    ) -> DecodeResult:
        """Images from latents (mode: mean, mode or sample; "probs" = mode plus the distributions).

        Image i's draws (mode=sample) come from default_rng([seed, i, 1]).
        """
        with_probs = with_probs or mode == "probs"
        self.check_seed(seed)
        if with_probs and len(z) * mv.dim * mv.levels > MAX_PROBS_NUMBERS:
            raise InvalidInput(
                f"mode=probs would return {len(z) * mv.dim * mv.levels} numbers (limit {MAX_PROBS_NUMBERS}); "
                "ask for fewer latents",
                "mode",
                code="too_large",
            )
        pixel_mode = "mode" if mode == "probs" else mode

        def post(piece: tuple[np.ndarray, ...], start: int) -> tuple[np.ndarray, ...]:
            probs = piece[0]
            if pixel_mode == "sample":
                images = np.stack(
                    [
                        images_from_probs(p[None], "sample", np.random.default_rng([seed, start + i, 1]))[0]
                        for i, p in enumerate(probs)
                    ]
                )
            else:
                images = images_from_probs(probs, pixel_mode)
            return (images, probs) if with_probs else (images,)

        job = self._job(RowsJob, "decode", mv, len(z), ctx, inputs=z, post=post)
        out = await self._run(job, ctx)
        return DecodeResult(mv, out[0], out[1] if with_probs else None)

    async def reconstruction_means(self, mv: ModelVersion, x: np.ndarray, ctx: RequestContext) -> np.ndarray:
        """E[x|z = mu(x)] (B, D) in levels (`map_means` reads x against it, or against its refilled image's): one
        encoder and one decoder row an image, scheduled like /reconstruct's."""
        enc = await self.encode(mv, x, ctx)

        def post(piece: tuple[np.ndarray, ...], start: int) -> tuple[np.ndarray, ...]:
            return (expected_values(piece[0]),)

        job = self._job(RowsJob, "decode", mv, len(x), ctx, inputs=enc.mu, post=post)
        (means,) = await self._run(job, ctx)
        return np.asarray(means)

    async def map_means(
        self, mv: ModelVersion, expected_nll: np.ndarray, x: np.ndarray, ctx: RequestContext
    ) -> np.ndarray | None:
        """The reconstruction the map's residual part reads rows x against (None: the map has none), scheduled:
        the steps of vae_contract.maps.map_means, each reconstruction as `reconstruction_means`."""
        if mv.map_reconstructions == 0:
            return None
        means = await self.reconstruction_means(mv, x, ctx)
        if mv.map_reconstructions == 2:
            means = await self.reconstruction_means(mv, mv.refilled_images(expected_nll, x, means), ctx)
        return means

    async def sample(self, mv: ModelVersion, n: int, mode: str, seed: int, ctx: RequestContext) -> DecodeResult:
        """n images from the prior: sample i's latent from default_rng([seed, i]), so n=5 is a prefix of n=10."""
        self.check_count(n, "n")
        z = np.concatenate([mv.sample_prior(1, np.random.default_rng([seed, i])) for i in range(n)])
        result = await self.decode(mv, z, mode, seed, ctx)
        result.z = z
        return result

    async def reconstruct(
        self, mv: ModelVersion, x: np.ndarray, mode: str, seed: int, ctx: RequestContext
    ) -> DecodeResult:
        enc = await self.encode(mv, x, ctx)
        return await self.decode(mv, enc.mu, mode, seed, ctx)

    async def score(
        self,
        mv: ModelVersion,
        x: np.ndarray,
        k: int,
        seed: int,
        score: str | None,
        fpr: float | None,
        ctx: RequestContext,
        anomaly_map: bool = False,
    ) -> ScoreResult:
        """Importance-sampled log-likelihood and the OOD score of each image, and with `anomaly_map` each
        image's anomaly map from the same samples: see models/README.md."""
        name, fpr = self.check_score_request(mv, len(x), k, score, fpr)
        self.check_seed(seed)
        map_calibration = self.check_map_request(mv) if anomaly_map else None
        pixels = mv.height * mv.width
        calib = mv.manifest.get("calibration") or {}
        llr = needs_llr(name, calib)
        tasks = [
            ImageTask(
                row,
                k,
                seed,
                mv.chunk,
                pixels=PixelNllAccumulator.empty(1, pixels) if anomaly_map else None,
                llr=ImportanceAccumulator.empty(1) if llr else None,
            )
            for row in x
        ]
        job = self._job(ScoreJob, "score", mv, len(x) * k, ctx, tasks=tasks)
        done: list[ImageTask] = await self._run(job, ctx)
        self.metrics.images_scored.labels(mv.name).inc(len(x))
        ll = np.array([t.acc.log_likelihood()[0] for t in done])
        elbo = np.array([t.acc.elbo()[0] for t in done])
        ess = np.array([t.acc.ess()[0] for t in done])
        nll_bpd = bits_per_dim(-ll, mv.dim)
        llr_bpd = None
        if llr:
            ll_k = np.array([t.llr.log_likelihood()[0] for t in done if t.llr is not None])
            llr_bpd = llr_bits_per_dim(ll, ll_k, mv.dim)
        if name == "nll_bpd":
            values = nll_bpd
        else:
            # off the event loop, as the routes decode images: complexity codes each image five times with zlib
            gap = elbo_gap_bits_per_dim(ll, elbo, mv.dim)
            values = (await asyncio.to_thread(mv.score_values, nll_bpd, x, llr_bpd, gap))[name]
        cal = mv.calibrations.get(name)
        if cal is not None:
            fpr = fpr if fpr is not None else float(calib.get("default_fpr", DEFAULT_FPR))
            cut = cal.threshold(fpr)
            threshold: float | None = cut
            p_value: np.ndarray | None = cal.p_values(values)
            is_ood: np.ndarray | None = values > cut
        else:
            fpr, threshold, p_value, is_ood = None, None, None, None
        maps = None
        engine = mv.score_engine(map_calibration is not None, llr).info.label
        if map_calibration is not None:
            map_fpr = fpr if fpr is not None else float(calib.get("default_fpr", DEFAULT_FPR))
            expected = np.concatenate([t.pixels.expected_nll() for t in done if t.pixels is not None])
            means = await self.map_means(mv, expected, x, ctx)
            values_map = mv.anomaly_maps(expected, x, means)
            cut_map = ScoreCalibration.from_block("anomaly_map", map_calibration).threshold(map_fpr)
            maps = MapResult(values_map, cut_map, map_fpr, str(map_calibration["units"]))
        return ScoreResult(
            mv, k, seed, engine, ll, elbo, ess, name, SCORE_UNITS[name], values, fpr, threshold, p_value, is_ood, maps
        )
