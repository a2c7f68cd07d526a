"""Checkpoints: never written from non-finite weights, and last.ckpt is the final step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from migm.models.assets import CheckpointError
from migm.training.checkpoint_io import AtomicCheckpointIO, FinalStepCheckpoint


def test_non_finite_weights_or_optimizer_state_are_never_written(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"last.ckpt: not written at global step 12: .*'network.w'"):
        io.save_checkpoint({"global_step": 12, "state_dict": {"network.w": torch.tensor([1.0, float("nan")])}}, path)
    state = {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}, "param_groups": []}
    with pytest.raises(CheckpointError, match=r"optimizer_states.0.state.0.exp_avg"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [state]}, path)
    assert not list(tmp_path.iterdir())                       # nothing, not even a temporary
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 2


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


@pytest.mark.parametrize("callback, expected", [(ModelCheckpoint, 7), (FinalStepCheckpoint, 10)])
def test_last_checkpoint_is_the_final_step_when_max_steps_ends_mid_epoch(tmp_path, callback, expected):
    """7 batches an epoch, max_steps 10: Lightning's own ModelCheckpoint leaves last.ckpt at the
    end of epoch 0 (step 7, the bug this guards); FinalStepCheckpoint writes step 10."""
    ckpt = callback(dirpath=tmp_path, filename="best", monitor="val_loss", save_last=True)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()])
    trainer.fit(Regression(), _data(14), _data(4))
    assert trainer.global_step == 10
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == expected
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == 7


DDP_SCRIPT = '''
import sys, lightning as L, torch
sys.path.insert(0, sys.argv[2])
from test_checkpoint_io import Regression, _data
from migm.training.checkpoint_io import AtomicCheckpointIO, FinalStepCheckpoint
ckpt = FinalStepCheckpoint(dirpath=sys.argv[1], filename="best", monitor="val_loss", save_last=True)
trainer = L.Trainer(max_steps=10, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                    plugins=[AtomicCheckpointIO()])
trainer.fit(Regression(), _data(28), _data(4))
'''


@pytest.mark.slow
def test_ddp_last_checkpoint_is_the_final_step(tmp_path):
    """The issue's case: 2 processes, 7 steps an epoch each, max_steps 10."""
    script = tmp_path / "ddp_last.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")
           and not k.startswith("MASTER_") and not k.startswith("PL_")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["global_step"] == 10
