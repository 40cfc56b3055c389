#!/usr/bin/env bash
# `make docker-test`: the images for real, on a machine with a Docker engine and the Compose plugin.
# Builds the serving image (and the train image with DOCKER_TEST_TRAIN=1), starts the compose stack under its
# own project name on a free port, waits for healthy, calls /readyz, /score, /sample, /v1/models (the scoring
# engine: openvino bf16 where the CPU has bf16) and /docs through the published port, checks that the serving
# image has no torch, that its trimmed OpenVINO loads, and that it runs as a non-root user, prints the figures
# (size, time to healthy, memory), and tears the stack down, on failure too.
#   DOCKER_TEST_PORT=8000     host port (default: a free one)
#   DOCKER_TEST_NO_CACHE=1    build from scratch (the build time then includes every download)
#   FAST_PATH=0               test the image without openvino (compose passes it as a build argument)
#   DOCKER_TEST_TRAIN=1       also build the train target and run `vae-train --help` in it; where the PyTorch
#                             CPU index is unreachable: TORCH_INDEX_URL= and the wheel in requirements/wheels/
#   DOCKER_TEST_COLOUR_MODEL=DIR  also serve this colour model version (e.g. from `vae-train --dataset
#                             folder:PHOTOS`) as colour/1 beside the shipped digits (through MODELS_DIR) and call
#                             it in colour: a base64 PNG and a multipart PNG to /score, /sample as an RGB PNG,
#                             and V2's score model with an N x H x W x 3 tensor
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=vae-serve-docker-test
PORT=${DOCKER_TEST_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export API_PORT=$PORT
compose=(docker compose -f docker-compose.yml)
build_flags=()
[ "${DOCKER_TEST_NO_CACHE:-0}" = 1 ] && build_flags+=(--no-cache)

say() { printf 'docker-test: %s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
now() { python3 -c 'import time; print(f"{time.monotonic():.3f}")'; }
elapsed() { python3 -c "print(f'{$(now) - $1:.1f}')"; }

docker info >/dev/null 2>&1 || fail "no Docker engine answers (start one; see deploy/README_SNIPPET.md)"
docker compose version >/dev/null 2>&1 || fail "the docker compose plugin is missing"
[ -f models/digits/1/manifest.json ] || fail "models/digits/1 is missing (make model)"

teardown() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    say "logs of the api:"
    "${compose[@]}" logs --no-color --tail 60 api 2>/dev/null || true
  fi
  "${compose[@]}" --profile train down --volumes --remove-orphans >/dev/null 2>&1 || true
  if [ $rc -eq 0 ]; then say "PASSED"; else say "FAILED (exit $rc)"; fi
}
trap teardown EXIT

if [ -n "${DOCKER_TEST_COLOUR_MODEL:-}" ]; then
  [ -f "$DOCKER_TEST_COLOUR_MODEL/manifest.json" ] || fail "$DOCKER_TEST_COLOUR_MODEL holds no model version"
  MODELS_TMP=$(mktemp -d)
  trap 'teardown; rm -rf "$MODELS_TMP"' EXIT
  mkdir -p "$MODELS_TMP/digits" "$MODELS_TMP/colour"
  cp -r models/digits/1 "$MODELS_TMP/digits/1"
  cp -r "$DOCKER_TEST_COLOUR_MODEL" "$MODELS_TMP/colour/1"
  chmod -R a+rX "$MODELS_TMP"  # the container's user reads the bind mount
  export MODELS_DIR=$MODELS_TMP
  say "serving models/digits/1 and $DOCKER_TEST_COLOUR_MODEL (as colour/1) from $MODELS_TMP"
fi

t=$(now)
"${compose[@]}" build ${build_flags[@]+"${build_flags[@]}"} api
BUILD_S=$(elapsed "$t")
IMAGE=$("${compose[@]}" config --images api | head -n1)
SIZE_MB=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f", $1 / 1e6}')
say "built $IMAGE in ${BUILD_S}s, ${SIZE_MB} MB"

# the serving image: no torch, and a non-root user
if docker run --rm --entrypoint python "$IMAGE" -c "import torch" >/dev/null 2>&1; then
  fail "torch imports in the serving image"
fi
# the trimmed OpenVINO (CPU plugin only; FAST_PATH=0 images have none) still loads and reports its capabilities
OV_CAPS=$(docker run --rm --entrypoint python "$IMAGE" -c "
import importlib.util
if importlib.util.find_spec('openvino') is None:
    print('none')
else:
    import openvino as ov
    print(','.join(ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')))") || fail "openvino in $IMAGE does not load"
say "openvino CPU capabilities: $OV_CAPS"
IMAGE_UID=$(docker run --rm --entrypoint id "$IMAGE" -u)
[ "$IMAGE_UID" != 0 ] || fail "the serving image runs as root"

t=$(now)
"${compose[@]}" up -d api
CID=$("${compose[@]}" ps -q api)
deadline=$(( $(date +%s) + ${DOCKER_TEST_HEALTHY_TIMEOUT:-180} ))
while :; do
  status=$(docker inspect -f '{{.State.Health.Status}}' "$CID")
  [ "$status" = healthy ] && break
  [ "$(docker inspect -f '{{.State.Running}}' "$CID")" = true ] || fail "the api container stopped"
  [ "$(date +%s)" -lt "$deadline" ] || fail "not healthy after ${DOCKER_TEST_HEALTHY_TIMEOUT:-180}s (status: $status)"
  sleep 0.5
done
HEALTHY_S=$(elapsed "$t")
RUN_UID=$(docker exec "$CID" id -u)
[ "$RUN_UID" != 0 ] || fail "the api container runs as root"
say "healthy ${HEALTHY_S}s after 'docker compose up'; runs as uid $RUN_UID"

SCORE=$(python3 - "$PORT" "$OV_CAPS" <<'PY'
import json, sys, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
ov_caps = sys.argv[2].split(",")


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200, (path, r.status)
        return json.load(r)


ready = call("/readyz")
assert ready.get("ready") is True, ready
digit = [[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
         [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
         [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]
score = call("/score", {"images": [digit], "num_samples": 1000, "seed": 0})
text = json.dumps(score)
assert "nll" in text or "log_likelihood" in text, score
sample = call("/sample", {"n": 2, "seed": 1})
assert sample, sample
# the scoring engine: OpenVINO bf16 wherever the image has openvino and the CPU has bf16 instructions (unless a
# version fails its bf16 parity check: a property of that model, not of the image)
expected = ("openvino", "bf16") if "BF16" in ov_caps else ("onnxruntime", "fp32")
engines = set()
for model in call("/v1/models")["models"]:
    for version, details in model["details"].items():
        scoring = details["scoring"]
        engines.add(f"{model['name']}/{version}: {scoring['engine']} {scoring['precision']}")
        if "parity check failed" not in (scoring.get("fallback") or ""):
            assert (scoring["engine"], scoring["precision"]) == expected, (model["name"], version, expected, scoring)
# a colour model (DOCKER_TEST_COLOUR_MODEL), in colour through the published port
if "colour" in {m["name"] for m in call("/v1/models")["models"]}:
    import base64, struct, zlib

    def png(rows):  # an 8-bit RGB PNG from rows of (r, g, b) pixels, with the standard library only
        raw = b"".join(b"\0" + bytes(v for px in row for v in px) for row in rows)
        chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        ihdr = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

    def post(path, data, headers):  # the raw answer of a POST that is not a JSON request and reply
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers), timeout=60) as r:
            return r.read()

    shape = call("/v2/models/colour-score")["parameters"]["image"]
    h, w, c = shape["height"], shape["width"], shape["channels"]
    assert c == 3, shape
    rows = [[(255 * x // w, 255 * y // h, 128) for x in range(w)] for y in range(h)]
    photo = png(rows)
    by_json = call("/score", {"model": "colour", "images": [base64.b64encode(photo).decode()], "num_samples": 100})
    boundary = "vae-docker-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"p.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + photo + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ncolour"
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"num_samples\"\r\n\r\n100"
            f"\r\n--{boundary}--\r\n").encode()
    by_upload = json.loads(post("/score/upload", body, {"content-type": f"multipart/form-data; boundary={boundary}"}))
    a, b = by_json["results"][0], by_upload["results"][0]
    assert a["log_likelihood_nats"] == b["log_likelihood_nats"], (a, b)
    sample_png = post("/sample", json.dumps({"model": "colour", "n": 1, "seed": 1}).encode(),
                      {"content-type": "application/json", "accept": "image/png"})
    width, height, depth, colour_type = struct.unpack(">IIBB", sample_png[16:26])
    assert (width, height, depth, colour_type) == (w, h, 8, 2), (width, height, depth, colour_type)  # 8-bit RGB
    pixels = [v * (shape["levels"] - 1) // 255 for row in rows for px in row for v in px]
    v2 = call("/v2/models/colour-score/infer", {"inputs": [
        {"name": "x", "datatype": "INT64", "shape": [1, h, w, 3], "data": pixels}], "parameters": {"num_samples": 100}})
    v2_ll = next(o for o in v2["outputs"] if o["name"] == "log_likelihood")["data"][0]
    print(f"colour/1 ({h}x{w}x3): /score {a['nll_bits_per_dim']:.3f} bits/dim (K=100) by base64 PNG and multipart, "
          f"/sample an RGB PNG, V2 log p {v2_ll:.1f} nats", file=sys.stderr)
# Swagger UI from the image's own assets (no CDN)
for path in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        assert r.status == 200 and r.read(), path
print(", ".join(sorted(engines)), "|", json.dumps(score, separators=(",", ":")))
PY
) || fail "API calls through port $PORT"
say "/readyz, /sample, /v1/models, /docs 200; scoring engines | /score (one 8x8 digit, K=1000): $SCORE"
MEM=$(docker stats --no-stream --format '{{.MemUsage}}' "$CID")
say "memory of the api container (docker stats): $MEM"

if [ "${DOCKER_TEST_TRAIN:-0}" = 1 ]; then
  t=$(now)
  "${compose[@]}" --profile train build ${build_flags[@]+"${build_flags[@]}"} train
  TRAIN_BUILD_S=$(elapsed "$t")
  TRAIN_IMAGE=$("${compose[@]}" --profile train config --images train | head -n1)
  TRAIN_MB=$(docker image inspect -f '{{.Size}}' "$TRAIN_IMAGE" | awk '{printf "%.0f", $1 / 1e6}')
  docker run --rm "$TRAIN_IMAGE" --help >/dev/null || fail "vae-train --help in $TRAIN_IMAGE"
  docker run --rm --entrypoint python "$TRAIN_IMAGE" -c \
    "import torch, sys; sys.exit(torch.version.cuda and 'CUDA build' or 0)" || fail "torch in $TRAIN_IMAGE is not CPU-only"
  [ "$(docker run --rm --entrypoint id "$TRAIN_IMAGE" -u)" != 0 ] || fail "the train image runs as root"
  say "built $TRAIN_IMAGE in ${TRAIN_BUILD_S}s, ${TRAIN_MB} MB (CPU-only torch, vae-train runs)"
fi

say "summary: serving image build ${BUILD_S}s, size ${SIZE_MB} MB, up->healthy ${HEALTHY_S}s, memory ${MEM%% /*}"
