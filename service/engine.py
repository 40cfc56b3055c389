"""Inference engines over a version's ONNX graphs, and the choice of the scoring engine.

onnxruntime fp32 runs every graph and is the reference. For scoring (the log_weights graph, where the
time goes) a faster engine may stand in: OpenVINO in bf16 where the CPU has bf16 instructions. It
is chosen by what the machine supports and by a parity check against fp32 on the manifest's check
images when the version loads, never by timing, so one machine always serves the same numbers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.scoring import score_direct
from service.settings import Settings
from vae_contract.manifest import noise_width

log = logging.getLogger("vae_serve")


@dataclass(frozen=True)
class EngineInfo:
    name: str  # "onnxruntime" or "openvino"
    precision: str  # "fp32" or "bf16"

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


class OrtEngine:
    """onnxruntime sessions of the three graphs, fp32: the reference."""

    info = EngineInfo("onnxruntime", "fp32")
    # Scoring calls of about 1000 rows: the elementwise tensors of the likelihood then stay in the
    # core's cache; 10,000-row calls scored 15-20% fewer images a second on digits (README, Performance).
    rows_per_call = 1000

    def __init__(self, version_dir: Path, graphs: dict[str, str], threads: int):
        def options(spin: bool) -> ort.SessionOptions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            # No arena, so the memory of a large call goes back to the system afterwards.
            opts.enable_cpu_mem_arena = False
            # Spinning pool threads (between a call's kernels, stopped when it returns) pay on the
            # scoring graph: ~90 kernels a call, and waking sleeping threads for each cost 13% of its
            # time. On the encoder and decoder (a few kernels, often one image) they only took the CPU
            # from the event loop: one-image /v2 encode p95 3.2 against 0.85 ms at concurrency 1.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            opts.add_session_config_entry("session.force_spinning_stop", "1")
            return opts

        self.sessions = {
            name: ort.InferenceSession(
                str(version_dir / fname),
                options(name in ("log_weights", "pixel_log_weights", "llr_log_weights")),
                providers=["CPUExecutionProvider"],
            )
            for name, fname in graphs.items()
        }

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, log_var = self.sessions["encoder"].run(None, {"x": x})
        return mu, log_var

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.sessions["decoder"].run(None, {"z": z})[0]

    def log_weights(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        return self.sessions["log_weights"].run(None, {"x": x, "eps": eps})[0]

    def pixel_log_weights(self, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log_w (K, B) and each pixel's log p(x_p|z) (K, B, H x W); KeyError on a version exported before the graph."""
        log_w, pixel_log_px = self.sessions["pixel_log_weights"].run(None, {"x": x, "eps": eps})
        return log_w, pixel_log_px

    def llr_log_weights(self, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log_w (K, B) and L>k's log_w_llr (K, B): the llr_log_weights graph of a model of several latent layers."""
        log_w, log_w_llr = self.sessions["llr_log_weights"].run(None, {"x": x, "eps": eps})
        return log_w, log_w_llr


class OpenVinoEngine:
    """The log_weights graph compiled by OpenVINO's CPU plugin at a given inference precision.

    In bf16 with the manifest's `low_precision_span`, the graph runs as three compiled models: fp32 up to
    the span's input (the encoder, z, the decoder's first layer), bf16 over the span (the decoder's
    later matrix products, whose fp32 results leave the model unrounded), fp32 after it (the prior,
    q(z|x) and the likelihood's elementwise work). Compiled whole in bf16, OpenVINO would also round
    the encoder's outputs and every layer's results to bf16, which costs ~2.5x the accuracy (README,
    Performance). A version without the span runs whole.
    """

    def __init__(self, graph: Path, precision: str, threads: int, span: dict[str, str] | None = None):
        import openvino as ov

        self.info = EngineInfo("openvino", precision)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "ENABLE_CPU_PINNING": False,
        }
        core = ov.Core()
        fp32 = {**config, "INFERENCE_PRECISION_HINT": "f32"}
        low = {**config, "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if precision == "bf16" and span:
            self.stages = [
                core.compile_model(model, "CPU", cfg)
                for model, cfg in zip(_split_at_span(core, graph, span["input"], span["output"]), (fp32, low, fp32))
            ]
            self.detail = f"bf16 between {span['input']} and {span['output']}, fp32 elsewhere"
        else:
            self.stages = [core.compile_model(str(graph), "CPU", low)]
            self.detail = f"{precision} throughout"
        self._local = threading.local()  # an infer request is not thread-safe: one set per worker thread

    def _outputs(self, x: np.ndarray, eps: np.ndarray) -> list[np.ndarray]:
        reqs = getattr(self._local, "reqs", None)
        if reqs is None:
            reqs = self._local.reqs = [stage.create_infer_request() for stage in self.stages]
        if len(reqs) == 1:
            return [np.array(v, copy=True) for v in reqs[0].infer({"x": x, "eps": eps}).values()]
        # The intermediate tensors pass between the stages without copies; each request owns its outputs
        # until its next call, and the three run one after another.
        hidden = reqs[0].infer([x, eps], share_outputs=True)[0]
        features = reqs[1].infer([hidden], share_inputs=True, share_outputs=True)[0]
        return [np.array(v, copy=True) for v in reqs[2].infer([x, eps, features], share_inputs=True).values()]

    def log_weights(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        return self._outputs(x, eps)[0]

    def pixel_log_weights(self, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For an engine compiled from pixel_log_weights.onnx: log_w (K, B) and pixel_log_px (K, B, H x W)."""
        log_w, pixel_log_px = self._outputs(x, eps)
        return log_w, pixel_log_px


def _split_at_span(core: Any, graph: Path, span_in: str, span_out: str) -> list[Any]:
    """The graph cut into (inputs -> span_in), (span_in -> span_out), (inputs + span_out -> outputs)."""
    from openvino import Model
    from openvino import opset13 as ops

    def port(model: Any, name: str) -> Any:
        for op in model.get_ops():
            for out in op.outputs():
                if name in out.get_names():
                    return out
        raise ValueError(f"{graph.name} has no tensor named {name!r} (manifest low_precision_span)")

    def cut(model: Any, name: str) -> Any:
        """Feed the consumers of tensor `name` from a new parameter instead; return the parameter."""
        out = port(model, name)
        param = ops.parameter(out.get_partial_shape(), out.get_element_type(), name=name)
        for target in out.get_target_inputs():
            target.replace_source_output(param.output(0))
        return param

    whole = core.read_model(str(graph))  # read once; each stage is cut from its own copy of the graph
    head = whole.clone()
    head = Model([ops.result(port(head, span_in))], head.get_parameters(), "head")
    span = whole.clone()
    out = port(span, span_out)
    span = Model([ops.result(out)], [cut(span, span_in)], "span")
    tail = whole
    features = cut(tail, span_out)
    tail = Model(tail.get_results(), [*tail.get_parameters(), features], "tail")
    return [head, span, tail]


def openvino_bf16_capable() -> tuple[bool, str]:
    """Whether OpenVINO is installed and its CPU plugin reports bf16 support on this machine."""
    try:
        import openvino as ov
    except ImportError:
        return False, "openvino is not installed"
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        return False, "this CPU has no bf16 instructions (OpenVINO CPU capabilities: " + ", ".join(caps) + ")"
    return True, "CPU has bf16 instructions"


@dataclass
class ScoringChoice:
    engine: Any  # OrtEngine or OpenVinoEngine
    info: EngineInfo
    reason: str
    parity: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None  # why the requested or preferred fast path is not used
    pixel_engine: Any = None  # the engine of anomaly-map requests (pixel_log_weights), None: the reference
    pixel_parity: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.info.name,
            "precision": self.info.precision,
            "reason": self.reason,
            "parity": self.parity,
            "fallback": self.fallback,
            "anomaly_maps": self.pixel_parity or None,
        }


def check_log_likelihoods(
    engine: Any, check: dict[str, Any], latent_dim: int, chunk: int, max_images: int
) -> np.ndarray:
    """An engine's log p(x) (nats) of the manifest's check images, at the check's K and seed."""
    x = np.asarray(check["images"], dtype=np.int64)
    seeds = [int(check["seed"])] * len(x)
    tasks = score_direct(engine, x, int(check["K"]), seeds, latent_dim, chunk, max_images)
    return np.array([t.acc.log_likelihood()[0] for t in tasks])


def check_parity(
    fast: Any, ll_ref: np.ndarray, check: dict[str, Any], latent_dim: int, chunk: int, max_images: int
) -> dict[str, Any]:
    """|log p(x)| differences (nats) of a candidate engine against the reference's log-likelihoods `ll_ref` of
    the manifest's check images (`check_log_likelihoods` of the reference, which loading has already run)."""
    x = np.asarray(check["images"], dtype=np.int64)
    k = int(check["K"])
    ll_fast = check_log_likelihoods(fast, check, latent_dim, chunk, max_images)
    diff = np.abs(ll_fast - ll_ref)
    return {
        "images": int(len(x)),
        "K": k,
        "mean_abs_diff_nats": round(float(diff.mean()), 6),
        "max_abs_diff_nats": round(float(diff.max()), 6),
    }


def choose_scoring_engine(
    settings: Settings,
    version_dir: Path,
    manifest: dict[str, Any],
    ref: OrtEngine,
    chunk: int,
    max_images: int,
    ll_ref: np.ndarray,
) -> ScoringChoice:
    """The engine /score runs on for this version, with the reason, the parity figures and any fallback.
    `ll_ref`: the reference's log-likelihoods of the check images (`check_log_likelihoods`), which loading
    computed to verify the export: the parity check compares with them instead of scoring them again."""
    reference = ScoringChoice(ref, ref.info, "onnxruntime fp32 (the reference)")
    if settings.engine == "onnxruntime":
        reference.reason = "setting engine=onnxruntime"
        return reference
    capable, why = openvino_bf16_capable()
    precision = settings.precision
    if precision == "auto":
        if not capable:
            if settings.engine == "openvino" and why != "openvino is not installed":
                precision = "fp32"
            else:
                reference.reason = f"onnxruntime fp32: no bf16 fast path ({why})"
                if settings.engine == "openvino":
                    reference.fallback = why
                    log.warning(
                        "%s: engine=openvino requested but %s; scoring on onnxruntime fp32", version_dir.name, why
                    )
                return reference
        else:
            precision = "bf16"
    if precision == "fp32" and settings.engine == "auto":
        reference.reason = "setting precision=fp32"
        return reference
    graph = version_dir / manifest["graphs"]["log_weights"]["file"]
    try:
        span = manifest["graphs"]["log_weights"].get("low_precision_span")
        fast = OpenVinoEngine(graph, precision, settings.threads(), span)
        parity = check_parity(fast, ll_ref, manifest["check"], noise_width(manifest), chunk, max_images)
    except Exception as exc:  # noqa: BLE001 - a fast path that cannot even run falls back, loudly
        reason = f"openvino {precision} failed to load or run: {exc.__class__.__name__}: {exc}"
        log.warning("%s: %s; scoring on onnxruntime fp32", version_dir.name, reason)
        reference.fallback = reason
        return reference
    ok = (
        parity["mean_abs_diff_nats"] <= settings.fast_path_mean_tolerance_nats
        and parity["max_abs_diff_nats"] <= settings.fast_path_max_tolerance_nats
    )
    if not ok:
        reason = (
            f"openvino {precision} parity check failed on {parity['images']} check images (K={parity['K']}): "
            f"mean |diff| {parity['mean_abs_diff_nats']} nats (tolerance {settings.fast_path_mean_tolerance_nats}), "
            f"max {parity['max_abs_diff_nats']} (tolerance {settings.fast_path_max_tolerance_nats})"
        )
        log.warning("%s: %s; scoring on onnxruntime fp32", version_dir.name, reason)
        reference.fallback, reference.parity = reason, parity
        return reference
    choice = ScoringChoice(fast, fast.info, f"openvino {fast.detail}: {why}, parity check passed", parity)
    choice.pixel_engine, choice.pixel_parity = fast_pixel_engine(
        version_dir, manifest, ref, precision, settings.threads(), chunk, max_images
    )
    return choice


MAP_PARITY_MAX_NATS = 0.05  # a pixel's expected NLL, fast path against fp32, on the check images


def fast_pixel_engine(
    version_dir: Path, manifest: dict[str, Any], ref: OrtEngine, precision: str, threads: int, chunk: int, images: int
) -> tuple[Any, dict[str, Any]]:
    """The pixel_log_weights graph on the fast path, when its expected pixel NLLs stay within
    MAP_PARITY_MAX_NATS of onnxruntime fp32's on the check images; else (None, why): maps run on the reference."""
    spec = manifest["graphs"].get("pixel_log_weights")
    if spec is None:
        return None, {}
    try:
        fast = OpenVinoEngine(version_dir / spec["file"], precision, threads, spec.get("low_precision_span"))
        x = np.asarray(manifest["check"]["images"], dtype=np.int64)[:images]
        pixels = int(manifest["image"]["height"]) * int(manifest["image"]["width"])
        latent, maps = noise_width(manifest), []
        for engine in (fast, ref):
            tasks = score_direct(engine, x, chunk, [0] * len(x), latent, chunk, images, engine, pixels)
            maps.append(np.concatenate([t.pixels.expected_nll() for t in tasks if t.pixels is not None]))
        worst = float(np.abs(maps[0] - maps[1]).max())
    except Exception as exc:  # noqa: BLE001 - maps then run on the reference engine
        return None, {"engine": "onnxruntime fp32", "reason": f"{exc.__class__.__name__}: {exc}"}
    parity = {"images": int(len(x)), "K": chunk, "max_abs_diff_pixel_nll_nats": round(worst, 6)}
    if not worst <= MAP_PARITY_MAX_NATS:
        return None, {**parity, "engine": "onnxruntime fp32", "reason": f"over {MAP_PARITY_MAX_NATS} nats"}
    return fast, {**parity, "engine": fast.info.label}
