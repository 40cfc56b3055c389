"""Write N 8-bit PNG crops (grey, or RGB with --colour) of scikit-learn's bundled sample photos, or of the
images given with --photos, to a folder (a seeded, offline stand-in for "my own images" in the README's folder
example and the acceptance runs).

    python scripts/make_patches.py /tmp/patches600 --n 600 --size 28 --seed 0
    python scripts/make_patches.py /tmp/patches600s --scale 4 12   # regions 4-12x larger, box-downscaled
    python scripts/make_patches.py /tmp/colour5000 --n 5000 --size 32 --scale 2 8 --colour
    python scripts/make_patches.py /tmp/grass --n 3000 --size 32 --photos grass.png   # a texture of your own

Native-resolution crops carry the photos' fine texture and JPEG noise; downscaled regions are smoother.
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
    ap.add_argument(
        "--scale", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
        help="crop a region MIN..MAX times the size and box-downscale it (default: native-resolution crops)",
    )  # fmt: skip
    ap.add_argument("--colour", action="store_true", help="RGB crops (default: greyscale)")
    ap.add_argument(
        "--photos", type=Path, nargs="+", default=None,
        help="crop these image files instead of scikit-learn's sample photos (china.jpg, flower.jpg)",
    )  # fmt: skip
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    mode = "RGB" if args.colour else "L"
    if args.photos is None:
        sources = [Image.fromarray(img) for img in load_sample_images().images]
    else:
        sources = [Image.open(p) for p in args.photos]
    photos = [np.asarray(img.convert(mode)) for img in sources]
    args.out.mkdir(parents=True, exist_ok=True)
    s = args.size
    for i in range(args.n):
        photo = photos[i % len(photos)]
        r = s if args.scale is None else int(rng.integers(args.scale[0] * s, args.scale[1] * s))
        y, x = rng.integers(0, photo.shape[0] - r), rng.integers(0, photo.shape[1] - r)
        patch = Image.fromarray(photo[y : y + r, x : x + r])
        if r != s:
            patch = patch.resize((s, s), Image.Resampling.BOX)
        patch.save(args.out / f"patch_{i:04d}.png")
    print(f"wrote {args.n} {s}x{s} 8-bit {'RGB' if args.colour else 'grey'} PNGs to {args.out}")


if __name__ == "__main__":
    main()
