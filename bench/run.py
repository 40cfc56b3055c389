"""`make bench`: scoring throughput of the served path (onnxruntime) against eager PyTorch, in one run.

Writes bench/results.json. Not a timed test: figures are reported as a ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(prog="bench")
    p.add_argument("--model", type=Path, default=Path("models/digits/1"))
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args()

    import torch

    from service.repository import load_version
    from service.settings import Settings
    from training.data import prepare
    from training.evaluate import log_likelihood
    from training.export import load_checkpoint

    x = prepare("digits").flat("test")[: args.images]
    mv = load_version(args.model, Settings())
    model = load_checkpoint(args.model)
    t0 = time.perf_counter()
    mv.runtime.importance_stats(x, args.k, seed=0, chunk_elements=Settings().k_chunk_elements)
    ort_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    log_likelihood(model, torch.from_numpy(x), args.k, chunk=100, seed=0)
    torch_s = time.perf_counter() - t0
    n = args.images * args.k
    result = {
        "model": str(args.model),
        "images": args.images,
        "K": args.k,
        "onnxruntime_seconds": round(ort_s, 3),
        "torch_eager_seconds": round(torch_s, 3),
        "onnxruntime_samples_per_second": round(n / ort_s),
        "torch_samples_per_second": round(n / torch_s),
        "speedup_onnxruntime_over_torch": round(torch_s / ort_s, 2),
    }
    Path("bench/results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
