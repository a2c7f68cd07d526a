"""Sample quality: FID against the test split in a pluggable feature space, and class accuracy.

torchmetrics' FrechetInceptionDistance does the statistics (and their DDP synchronisation); the
real-image side is computed once per evaluator and kept across `reset()`, so scoring many
configurations costs one pass over the references.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.image.fid import FrechetInceptionDistance

from migm.models.assets import atomic_write_bytes
from migm.models.classifier import FashionClassifier


class QualityMetrics(nn.Module):
    def __init__(self, feature: nn.Module, classifier: FashionClassifier | None = None) -> None:
        super().__init__()
        self.feature_name = getattr(feature, "name", "fid")
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)
        self.classifier = classifier
        self.accuracy = MeanMetric()      # torchmetrics states: summed over DDP ranks on compute
        self.count = SumMetric()

    def clone(self) -> QualityMetrics:
        """An empty accumulator with the same reference statistics, sharing the networks."""
        other = QualityMetrics(self.fid.inception, self.classifier).to(self.fid.real_features_sum.device)
        for name in self._REAL_STATES:
            setattr(other.fid, name, getattr(self.fid, name).clone())
        return other

    @torch.no_grad()
    def add_real(self, images: torch.Tensor, batch_size: int = 500) -> None:
        """Reference images, float (n, 1, H, W) in [-1, 1]."""
        for chunk in images.split(batch_size):
            self.fid.update(chunk, real=True)

    @torch.no_grad()
    def add_fake(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.fid.update(images, real=False)
        self.count.update(len(images))
        if self.classifier is not None and labels is not None:
            self.accuracy.update((self.classifier(images).argmax(-1) == labels).float())

    _REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def save_reference(self, path: Path) -> None:
        """Cache the reference statistics (slow to compute with Inception on a CPU)."""
        states = {name: getattr(self.fid, name) for name in self._REAL_STATES}
        atomic_write_bytes(Path(path), lambda tmp: torch.save(states, tmp))

    def load_reference(self, path: Path) -> None:
        states = torch.load(path, map_location="cpu", weights_only=True)
        missing = [n for n in self._REAL_STATES if n not in states]
        if missing:
            raise ValueError(f"{path}: reference statistics lack fields {missing}")
        if states["real_features_sum"].shape != self.fid.real_features_sum.shape:
            raise ValueError(f"{path}: reference features have dimension "
                             f"{states['real_features_sum'].shape[0]}, this extractor has "
                             f"{self.fid.real_features_sum.shape[0]}")
        for name in self._REAL_STATES:
            setattr(self.fid, name, states[name])

    def compute(self) -> dict[str, float]:
        out = {self.feature_name: float(self.fid.compute()), "num_samples": int(self.count.compute())}
        if self.classifier is not None:
            out["class_accuracy"] = float(self.accuracy.compute())
        return out

    def reset(self) -> None:
        """Forget generated samples; keep the reference statistics."""
        for metric in (self.fid, self.accuracy, self.count):
            metric.reset()
