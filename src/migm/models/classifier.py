"""A small CNN trained on Fashion-MNIST: the fast feature space for FID on the embedded default.

Inception features are the standard for FID, but InceptionV3 runs at a few images/s on a CPU.
This network's penultimate layer (128-d) serves as the everyday feature space; every number it
produces is labelled "FID (classifier features)" so it is never mistaken for Inception FID. Its
logits also give the class accuracy of generated samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ClassifierConfig:
    channels: int = 32
    feature_dim: int = 128
    num_classes: int = 10
    dropout: float = 0.3


class FashionClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ClassifierConfig()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(1, c.channels), *stage(c.channels, 2 * c.channels),
                                  nn.Flatten(), nn.Linear(2 * c.channels * 49, c.feature_dim),
                                  nn.ReLU())
        self.classify = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.feature_dim, c.num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1, 28, 28) in [-1, 1] -> (B, feature_dim)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))
