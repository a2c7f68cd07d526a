"""Checkpoints: never written from non-finite weights, last.ckpt is the final step (inside its
epoch, so a resume trains what a straight run would), a full disk is one error."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from migm.files import CheckpointError, DiskFullError
from migm.training import checkpoint_io
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



def test_a_full_disk_at_a_checkpoint_is_one_error_and_the_last_one_resumes(tmp_path, monkeypatch, full_disk):
    def fit(max_steps, ckpt_path=None):
        ckpt = FinalStepCheckpoint(dirpath=tmp_path, filename="best", monitor="val_loss", save_last=True)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                            callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                            plugins=[AtomicCheckpointIO()])
        trainer.fit(Regression(), _data(14), _data(4), ckpt_path=ckpt_path)
        return trainer

    fit(5)
    before = (tmp_path / "last.ckpt").read_bytes()
    def fake_open(path, mode="r", *args, **kwargs):        # the checkpoint writer's open
        assert mode == "wb"
        return full_disk(path, "w", room=300)
    monkeypatch.setattr(checkpoint_io, "open", fake_open, raising=False)
    with pytest.raises(DiskFullError) as err:
        fit(10, tmp_path / "last.ckpt")
    assert str(err.value).startswith(f"{tmp_path / 'best.ckpt'}: no space left on device (")
    assert "\n" not in str(err.value) and err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]       # no temporary left
    assert (tmp_path / "last.ckpt").read_bytes() == before
    monkeypatch.undo()
    assert fit(10, tmp_path / "last.ckpt").global_step == 10
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 10

# --- a resume from any step trains exactly the batches of a straight run -------------------------
@pytest.fixture(scope="module")
def shards(record_trajectories):
    """12 real trajectories of the shipped base at N=4 (both CFG branches), recorded by
    `collect`: 9 train trajectories x 3 pairs x 2 branches = 54 samples, 7 batches of 8."""
    return record_trajectories(steps=4, trajectories=12, batch_size=6)


class Batches(L.Callback):
    """Which samples each training batch held (epoch, batch index, the first sample's step and
    a checksum of its features): a witness only, nothing of the run is changed."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, int(batch["step"][0]),
                          float(batch["features"].double().sum())))


def fit_shortcut(shards, out, max_steps: int, ckpt_path=None, devices: int = 1):
    """ShortcutModule (a small network) on the recorded shards, checkpointed by
    FinalStepCheckpoint: the module, the Batches witness and the trainer. The warm-up outlasts
    every run, so the learning rate does not depend on max_steps (which plans the cosine)."""
    from migm.data.datamodule import TrajectoryDataModule
    from migm.shortcut.network import ShortcutConfig
    from migm.training.shortcut import ShortcutModule

    L.seed_everything(0, verbose=False)
    network = ShortcutConfig(feature_dim=192, vocab_size=256, num_tokens=49, ratio=4, blocks=1,
                             heads=2, mlp_ratio=1.0)
    module = ShortcutModule(network=network, lr=1e-2, warmup_steps=1000)
    data = TrajectoryDataModule(dirs=[str(shards)], val_fraction=0.25, batch_size=8)
    witness = Batches()
    ckpt = FinalStepCheckpoint(dirpath=out, filename="best", monitor="val/rel_err", save_last=True)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, logger=False,
                        callbacks=[ckpt, witness], enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
                        **({"strategy": "ddp"} if devices > 1 else {}))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, witness, trainer


@pytest.mark.parametrize("stop", [5, 7, 9])
def test_a_resume_from_any_step_trains_the_batches_of_a_straight_run(shards, tmp_path, stop):
    """7 batches an epoch: stopped at step 5 (mid epoch 0), 7 (its end) or 9 (mid epoch 1),
    then resumed to 12; the weights (EMA too) equal a straight run's bit for bit."""
    straight, seen, _ = fit_shortcut(shards, tmp_path / "straight", 12)
    _, first, _ = fit_shortcut(shards, tmp_path / "cut", stop)
    ckpt = torch.load(tmp_path / "cut/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == stop and ckpt["epoch"] == (stop - 1) // 7      # the epoch in progress
    resumed, rest, _ = fit_shortcut(shards, tmp_path / "cut", 12, tmp_path / "cut/last.ckpt")
    assert first.seen + rest.seen == seen.seen
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


DDP_RESUME = '''
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from test_checkpoint_io import fit_shortcut
from pathlib import Path
shards, out = Path(sys.argv[1]), Path(sys.argv[3])
straight, seen, trainer = fit_shortcut(shards, out / "straight", 6, devices=2)
_, first, _ = fit_shortcut(shards, out / "cut", 2, devices=2)
resumed, rest, _ = fit_shortcut(shards, out / "cut", 6, out / "cut/last.ckpt", devices=2)
same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
with open(out / f"rank{trainer.global_rank}.json", "w") as f:
    json.dump({"same": same, "straight": seen.seen, "resumed": first.seen + rest.seen}, f)
'''


@pytest.mark.slow
def test_ddp_resume_mid_epoch_trains_the_batches_of_a_straight_run(shards, tmp_path):
    """2 processes, 27 samples each: 4 batches an epoch, stopped at step 2, resumed to 6."""
    import json

    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_RESUME)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK")
           and not k.startswith("MASTER_") and not k.startswith("PL_")}
    proc = subprocess.run([sys.executable, str(script), str(shards), str(Path(__file__).parent), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["resumed"] == got["straight"] and len(got["straight"]) == 6
        assert got["same"]
