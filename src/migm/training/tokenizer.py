"""Trains the VQ tokenizer: L1 + MSE reconstruction plus commitment; the codebook learns by EMA."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from migm.models.tokenizer import TokenizerConfig, VQTokenizer, psnr
from migm.training.schedule import configure


class TokenizerModule(L.LightningModule):
    def __init__(self, config: TokenizerConfig | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config or TokenizerConfig()
        self.tokenizer = VQTokenizer(self.config)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        recon, commit, _ = self.tokenizer(images)
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        loss = rec + self.config.commitment * commit
        used = (self.tokenizer.quantizer.cluster_size > 0.5).float().mean()
        self.log_dict({"train/loss": loss, "train/recon": rec, "train/codebook_usage": used},
                      prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        recon = self.tokenizer.decode(self.tokenizer.encode(images))
        self.log("val/psnr", psnr(recon, images).mean(), prog_bar=True)

    def configure_optimizers(self):
        return configure(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)
