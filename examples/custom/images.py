"""The user's own dataset: PNG images in one folder per class (ROOT/SPLIT/LABEL/*.png).

dlion calls `image_folders(root=...)` (config `data.name: "images:image_folders"`) and
reads samples by index; the partitioners take the labels from `targets`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib import image
from torch.utils.data import Dataset


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """Greyscale images of ROOT/LABEL/*.png, read from disk when asked for, normalised."""

    def __init__(self, root: str | Path, mean: float = 0.3, std: float = 0.35) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder (run make_data.py first)")
        self.classes = sorted((p.name for p in root.iterdir() if p.is_dir()), key=int)
        self.files: list[Path] = []
        self.targets: list[int] = []
        for label in self.classes:
            for file in sorted((root / label).glob("*.png")):
                self.files.append(file)
                self.targets.append(int(label))
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = image.imread(self.files[i])[..., 0]  # RGBA from the gray colormap: take R
        x = (torch.from_numpy(pixels.copy()).float() - self.mean) / self.std
        return x.unsqueeze(0), self.targets[i]


def image_folders(root: str = "data") -> tuple[ImageFolder, ImageFolder]:
    """(train, test) datasets of ROOT/train and ROOT/test."""
    return ImageFolder(Path(root) / "train"), ImageFolder(Path(root) / "test")
