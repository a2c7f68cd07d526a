"""Trains the FID feature network / sample classifier on Fashion-MNIST (with flip + shift aug)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from migm.models.classifier import ClassifierConfig, FashionClassifier
from migm.training.schedule import configure


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels, per batch."""
    if torch.rand(()) < 0.5:
        images = images.flip(-1)
    dx, dy = torch.randint(-2, 3, (2,)).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


class ClassifierModule(L.LightningModule):
    def __init__(self, config: ClassifierConfig | None = None, lr: float = 2e-3,
                 weight_decay: float = 1e-4, warmup_steps: int = 50) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config or ClassifierConfig()
        self.net = FashionClassifier(self.config)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(augment(images))
        loss = F.cross_entropy(logits, labels)
        self.log_dict({"train/loss": loss, "train/acc": (logits.argmax(-1) == labels).float().mean()},
                      prog_bar=True)
        return loss

    def _eval(self, batch, stage: str) -> None:
        images, labels = batch
        self.log(f"{stage}/acc", (self.net(images).argmax(-1) == labels).float().mean(), prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def configure_optimizers(self):
        return configure(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)
