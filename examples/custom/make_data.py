"""Write an image-folder dataset to ./data (offline): scikit-learn's digits, upscaled from
8x8 to 32x32 and saved as PNG files, one folder per class, as many users' own data is laid
out:  data/train/3/00017.png, data/test/7/00002.png, ...

    python make_data.py [--out data] [--size 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    args = parser.parse_args()
    write_folders(Path(args.out), args.size, args.test_fraction, limit=args.limit)


def write_folders(
    out: Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0, limit: int | None = None
) -> None:
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    big = big.clamp(0, 1).squeeze(1).numpy()
    order = np.random.default_rng(seed).permutation(len(big))[:limit]
    n_test = round(test_fraction * len(order))
    for split, idx in (("test", order[:n_test]), ("train", order[n_test:])):
        for i in idx:
            folder = out / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            image.imsave(folder / f"{i:05d}.png", big[i], cmap="gray", vmin=0.0, vmax=1.0)
    print(f"wrote {len(order) - n_test} train and {n_test} test images to {out}/")


if __name__ == "__main__":
    main()
