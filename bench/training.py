"""Training throughput: the product's loop (training.train) against a minimal plain PyTorch loop, same run.

Both train the default model (the same VAE module, so the same architecture and loss) on the same 28x28
8-bit images for the same number of epochs; the plain loop is the textbook one: shuffle, slice, loss,
zero_grad, backward, step, and nothing else (no weight average, no validation, no logging).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def images_28x28(n: int, seed: int = 0) -> np.ndarray:
    """n 8-bit 28x28 digit images: scikit-learn's digits upscaled (bilinear) with a little noise; no download."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    base = load_digits().images  # (1797, 8, 8), 0..16
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray((base[i % len(base)] * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)
        noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 4, (28, 28))
        out[i] = np.clip(np.rint(noisy), 0, 255)
    return out


def quick_version(out: Path, data: Any, cfg: Any) -> Path:
    """Train `cfg` on `data` (an ImageData) and export it to the version directory `out`, as the service
    loads it: for speed and memory figures, which depend on the architecture, not on how well it trained."""
    from training.export import write_version
    from training.train import train

    result = train(cfg, data, progress=False)
    write_version(
        result.model,
        out,
        verify_images=data.flat("test")[:64],
        metrics={},
        training={"config": cfg.to_dict()},
        data_info={"image_shape": list(data.shape)},
    )
    return out


def measure(
    n_train: int = 12000, epochs: int = 2, seed: int = 0, turns: int = 3, images: np.ndarray | None = None
) -> dict[str, Any]:
    """Both loops after a warm-up of each, then in `turns` alternating turns (the product's first in even
    turns); figures are the medians. Measured once each, product first, the product paid the process's
    first torch steps on these shapes (0.65x, then 0.89x in the next call of the same process) and any
    drift of the machine between the two. images: n_train + 2000 8-bit images (N, H, W[, C]) to train
    the default model for their shape on (default: generated 28x28 grey ones)."""
    from training.config import TrainConfig
    from training.data import ImageData
    from training.model import VAE
    from training.train import train

    if images is None:
        images = images_28x28(n_train + 2000, seed)
    data = ImageData(images[:n_train], images[n_train : n_train + 1000], images[n_train + 1000 :], 256, "bench")
    cfg = TrainConfig(epochs=epochs, patience=epochs + 1).resolve(256, n_train, data.shape)
    assert cfg.batch_size is not None
    batch = cfg.batch_size
    x = torch.from_numpy(data.flat("train"))

    def product(data: ImageData = data) -> float:
        t0 = time.perf_counter()
        train(cfg, data, progress=False)
        return time.perf_counter() - t0

    def plain(epochs: int = epochs, steps: int | None = None) -> float:
        """The textbook loop; `steps` stops it early (the warm-up)."""
        torch.manual_seed(cfg.seed)
        model = VAE(cfg, data.dim, data.levels, data.shape)
        opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=gen)
            for step, i in enumerate(range(0, len(x), batch)):
                if steps is not None and step >= steps:
                    break
                loss = model.loss(x[perm[i : i + batch]], cfg.iw_train, cfg.beta, gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return time.perf_counter() - t0

    # warm-up: torch's first steps on these shapes, for both loops (the product on a few batches of data)
    plain(epochs=1, steps=20)
    few = batch * 10
    product(ImageData(images[:few], images[n_train : n_train + few], images[n_train + 1000 :][:few], 256, "warm-up"))
    times: dict[str, list[float]] = {"product": [], "plain": []}
    for turn in range(turns):
        for name in ("product", "plain") if turn % 2 == 0 else ("plain", "product"):
            times[name].append(product() if name == "product" else plain())
    seen = n_train * epochs
    product_s, plain_s = float(np.median(times["product"])), float(np.median(times["plain"]))
    return {
        "data": f"{n_train} 8-bit {'x'.join(map(str, data.shape))} images, {epochs} epochs",
        "model": {
            "arch": cfg.arch,
            "likelihood": cfg.likelihood,
            "context": cfg.context,
            "batch_size": batch,
            "iw_train": cfg.iw_train,
            "hidden": cfg.hidden,
            "dropout": cfg.dropout,
            "steps_per_epoch": math.ceil(n_train / batch),
        },
        "turns": turns,
        "product_images_per_s": round(seen / product_s, 1),
        "plain_loop_images_per_s": round(seen / plain_s, 1),
        "ratio_product_over_plain": round(plain_s / product_s, 3),
        "ratio_each_turn": [round(b / a, 3) for a, b in zip(times["product"], times["plain"])],
        "threads": torch.get_num_threads(),
    }
