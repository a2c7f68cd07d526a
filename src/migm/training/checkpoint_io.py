"""Checkpoints written whole, finite and at the final step.

- Whole: temp file + rename, so a crash never leaves a truncated `last.ckpt` that a resume would
  then fail on (a killed writer's temporary is removed by the next write, see files.py); a full
  disk is one DiskFullError naming the checkpoint, the previous one left as it was.
- Finite: a diverged run is never saved; a NaN `best.ckpt` would otherwise be exported, tested and
  resumed from as if it were a model.
- Final step: Lightning's ModelCheckpoint saves at validation (here, epoch) ends, so a run that
  stops at `max_steps` in the middle of an epoch (any DDP run whose epoch length does not divide
  it) kept `last.ckpt` at the previous epoch end, and a resume silently repeated the lost steps.
  FinalStepCheckpoint saves that step as inside its epoch, so the resume continues there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from migm.files import CheckpointError, atomic_write_bytes, first_nonfinite


def _tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor nested in dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Refuses (CheckpointError naming the tensor) weights or optimizer state with NaN/inf."""
        named = (pair for key in ("state_dict", "optimizer_states")
                 for pair in _tensors(checkpoint.get(key, {}), key))
        bad = first_nonfinite(named)
        if bad is not None:
            raise CheckpointError(
                f"{path}: not written at global step {checkpoint.get('global_step', '?')}: "
                f"'{bad.removeprefix('state_dict.')}' has NaN or infinite values (training diverged)")
        atomic_write_bytes(Path(path), lambda tmp: _save(checkpoint, tmp))


def _save(checkpoint: dict[str, Any], tmp: Path) -> None:
    """torch.save through a Python file: a full disk then surfaces as the file's OSError (ENOSPC,
    chained under torch's RuntimeError) where torch's own stream reports only "basic_ios::clear:
    iostream error"; atomic_write_bytes turns either into one DiskFullError naming the checkpoint."""
    with open(tmp, "wb") as fh:
        torch.save(checkpoint, fh)


class FinalStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` when training ends at a step no save has
    covered (max_steps reached mid-epoch, or a stop). Top-k selection is unchanged: `best` still
    only changes at validation, where the monitored metric exists.

    An epoch cut short is saved as unfinished. Lightning ends it like any other (its
    `on_train_epoch_end`, after the module's own batch-end updates such as the EMA) and counts it
    processed first, so a checkpoint written there or at `on_train_end` said "epoch e done" and
    a resume started epoch e + 1, skipping the rest of e. Saved here with e still in progress,
    the loops resume inside e at its next batch, and the training loader's state
    (data/datamodule.py, ResumableLoader) serves that batch of e's order: a resume trains
    exactly the batches a straight run would have."""

    @staticmethod
    def _cut_short(trainer) -> bool:
        """The epoch ending now ended before its last batch."""
        served = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return served < trainer.num_training_batches

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._cut_short(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        progress = trainer.fit_loop.epoch_progress
        progress.total.processed -= 1               # while saving: the epoch is not done
        progress.current.processed -= 1
        try:
            super().on_train_epoch_end(trainer, pl_module)
            if self.save_last and not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            progress.total.processed += 1
            progress.current.processed += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if (self.save_last and not trainer.fast_dev_run and trainer.global_step > 0
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
