"""Trains the embedded base MIGM with the MaskGIT objective.

Each batch draws a mask ratio r = cosine(u), u ~ U(0, 1), per image (MaskGIT's training schedule),
masks ceil(r*L) random positions, and scores cross entropy on the masked positions only. Labels
are dropped to the null class with probability `label_dropout`, which is what makes
classifier-free guidance possible at sampling time. An EMA copy of the weights is kept and is
what gets exported.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from migm.data.images import ImageDataModule, load_fashion_mnist, to_model_range
from migm.models.tiny import load_tokenizer
from migm.models.tokenizer import VQTokenizer
from migm.models.transformer import MaskedTransformer, TransformerConfig
from migm.sampling.schedule import cosine
from migm.training.schedule import configure


def random_mask(tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ceil(cosine(u)*L) random positions of each row; returns (masked tokens, mask (B, L))."""
    B, Lt = tokens.shape
    u = torch.rand(B, generator=generator, device=tokens.device)
    n_masked = torch.ceil(cosine(u) * Lt).clamp(1, Lt)                          # (B,)
    scores = torch.rand(B, Lt, generator=generator, device=tokens.device)
    rank = scores.argsort(1).argsort(1)                                          # random ranks
    mask = rank < n_masked.unsqueeze(1)
    return tokens.masked_fill(mask, mask_id), mask


class EmbeddedBaseModule(L.LightningModule):
    def __init__(self, config: TransformerConfig | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 200, label_dropout: float = 0.1,
                 label_smoothing: float = 0.1, ema_decay: float = 0.999) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config or TransformerConfig()
        self.model = MaskedTransformer(self.config)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _loss(self, model: MaskedTransformer, tokens: torch.Tensor, labels: torch.Tensor):
        masked, mask = random_mask(tokens, self.config.mask_id)
        logits = model(masked, labels)                                          # (B, L, K)
        loss = F.cross_entropy(logits[mask], tokens[mask],
                               label_smoothing=self.hparams.label_smoothing)
        acc = (logits[mask].argmax(-1) == tokens[mask]).float().mean()
        return loss, acc

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        drop = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
        labels = labels.masked_fill(drop, self.config.num_classes)
        loss, acc = self._loss(self.model, tokens, labels)
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)

    def validation_step(self, batch, batch_idx):
        tokens, labels = batch
        loss, acc = self._loss(self.ema, tokens, labels)
        self.log_dict({"val/loss": loss, "val/acc": acc}, prog_bar=True)

    def configure_optimizers(self):
        return configure(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)


class TokenDataModule(ImageDataModule):
    """Fashion-MNIST encoded once by a trained tokenizer: (tokens (L,), label) pairs."""

    def __init__(self, tokenizer: str = "tokenizer.pt", root: str | None = None,
                 batch_size: int = 128, val_size: int = 5000, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__(root, batch_size, val_size, num_workers, seed)
        self.tokenizer_name = tokenizer

    @torch.no_grad()
    def _encode(self, images_uint8: torch.Tensor, tokenizer: VQTokenizer) -> torch.Tensor:
        x = to_model_range(images_uint8)
        return torch.cat([tokenizer.encode(chunk) for chunk in x.split(1000)])

    def setup(self, stage: str | None = None) -> None:
        tokenizer = load_tokenizer(self.tokenizer_name)
        images, labels = load_fashion_mnist("train", self.root)
        tokens = self._encode(images, tokenizer)
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size:]
        self.train_set = TensorDataset(tokens[train_idx], labels[train_idx])
        self.val_set = TensorDataset(tokens[val_idx], labels[val_idx])
        test_images, test_labels = load_fashion_mnist("test", self.root)
        self.test_set = TensorDataset(self._encode(test_images, tokenizer), test_labels)
