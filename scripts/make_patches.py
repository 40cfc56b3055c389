"""Write N 8-bit greyscale PNG crops of scikit-learn's bundled sample photos to a folder (a seeded, offline
stand-in for "my own 8-bit images" in the README's folder example and the 8-bit acceptance runs).

    python scripts/make_patches.py /tmp/patches600 --n 600 --size 28 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = [np.asarray(Image.fromarray(img).convert("L")) for img in load_sample_images().images]
    args.out.mkdir(parents=True, exist_ok=True)
    s = args.size
    for i in range(args.n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - s), rng.integers(0, photo.shape[1] - s)
        Image.fromarray(photo[y : y + s, x : x + s]).save(args.out / f"patch_{i:04d}.png")
    print(f"wrote {args.n} {s}x{s} 8-bit PNGs to {args.out}")


if __name__ == "__main__":
    main()
