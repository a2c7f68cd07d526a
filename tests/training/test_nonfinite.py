"""A diverging shortcut run stops with an error at the step it diverged, and saves nothing."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from migm.training.shortcut import ShortcutModule
from migm.shortcut.network import ShortcutConfig
from migm.training.checkpoint_io import AtomicCheckpointIO, FinalStepCheckpoint


def test_a_non_finite_loss_stops_fit_naming_the_step(tmp_path):
    """Issue 16.1: a NaN/inf loss is an error at that global step, never trained on or saved."""
    g = torch.Generator().manual_seed(0)

    def sample(k):
        f = torch.randn(49, 192, generator=g)
        if k >= 6:                                           # batches 0-2 finite, batch 3 on: inf
            f[3, 5] = float("inf")
        new = torch.rand(49, generator=g) < 0.2
        tokens = torch.where(new, torch.randint(0, 256, (49,), generator=g), 256)     # x_i: 256 = mask
        return {"features": f, "target": torch.randn(49, 192, generator=g), "tokens": tokens, "new": new,
                "t": torch.tensor(0.5), "step": torch.tensor(2), "branch": torch.tensor(0)}

    module = ShortcutModule(ShortcutConfig(feature_dim=192, vocab_size=256, num_tokens=49, ratio=2,
                                           blocks=1, heads=2), init_embeddings=False, warmup_steps=1)
    ckpt = FinalStepCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt], plugins=[AtomicCheckpointIO()])
    with pytest.raises(FloatingPointError, match=r"train/loss is not finite \((nan|inf) on this rank\) at global step 3"):
        trainer.fit(module, DataLoader([sample(k) for k in range(12)], batch_size=2))
    assert not list(tmp_path.glob("*.ckpt"))
