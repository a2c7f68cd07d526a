"""Sample quality: FID against the test split in a pluggable feature space, class accuracy, and
(with local CLIP weights) CLIPScore of each image against its condition's prompt.

torchmetrics' FrechetInceptionDistance does the statistics (and their DDP synchronisation); the
real-image side is computed once per evaluator and kept across `reset()`, so scoring many
configurations costs one pass over the references.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.image.fid import FrechetInceptionDistance

from migm.evaluation.clip import clip_score_metric, to_clip_images
from migm.models.assets import atomic_write_bytes
from migm.models.classifier import FashionClassifier


class QualityMetrics(nn.Module):
    def __init__(self, feature: nn.Module, classifier: FashionClassifier | None = None,
                 clip: tuple | None = None, prompts: Sequence[str] | None = None) -> None:
        """
        Args:
            feature: FID feature extractor (images in [-1, 1] -> (B, F)).
            classifier: scores class accuracy (samples' agreement with the requested label).
            clip: a loaded (CLIPModel, CLIPProcessor) pair (`evaluation.clip.load_clip`), shared
                by every clone; with it, `compute` adds `clip_score`.
            prompts: the text of each condition id, for CLIPScore.
        """
        super().__init__()
        if clip is not None and prompts is None:
            raise ValueError("CLIPScore needs prompts: the text each condition id stands for")
        self.feature_name = getattr(feature, "name", "fid")
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)
        self.classifier = classifier
        self.accuracy = MeanMetric()      # torchmetrics states: summed over DDP ranks on compute
        self.count = SumMetric()
        self.clip_pair, self.prompts = clip, list(prompts) if prompts is not None else None
        self.clip = clip_score_metric(*clip) if clip is not None else None

    def clone(self) -> QualityMetrics:
        """An empty accumulator with the same reference statistics, sharing the networks."""
        other = QualityMetrics(self.fid.inception, self.classifier, self.clip_pair, self.prompts)
        other = other.to(self.fid.real_features_sum.device)
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
        if self.clip is not None and labels is not None:
            self.clip.update(to_clip_images(images), [self.prompts[int(c)] for c in labels])

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
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
        return out

    def reset(self) -> None:
        """Forget generated samples; keep the reference statistics."""
        for metric in (self.fid, self.accuracy, self.count, self.clip):
            if metric is not None:
                metric.reset()
