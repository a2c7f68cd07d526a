"""Checkpoints written whole, finite and at the final step.

- Whole: temp file + rename, so a crash never leaves a truncated `last.ckpt` that a resume would
  then fail on (a killed writer's temporary is removed by the next write, see assets.py).
- Finite: a diverged run is never saved; a NaN `best.ckpt` would otherwise be exported, tested and
  resumed from as if it were a model.
- Final step: Lightning's ModelCheckpoint saves at validation (here, epoch) ends, so a run that
  stops at `max_steps` in the middle of an epoch (any DDP run whose epoch length does not divide
  it) kept `last.ckpt` at the previous epoch end, and a resume silently repeated the lost steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from migm.models.assets import CheckpointError, atomic_write_bytes, first_nonfinite


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
        atomic_write_bytes(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class FinalStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` when training ends at a step no save has
    covered (max_steps reached mid-epoch). Top-k selection is unchanged: `best` still only
    changes at validation, where the monitored metric exists."""

    def on_train_end(self, trainer, pl_module) -> None:
        if (self.save_last and not trainer.fast_dev_run and trainer.global_step > 0
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
