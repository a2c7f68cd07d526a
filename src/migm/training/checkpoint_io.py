"""Checkpoints written whole or not at all: temp file + rename, so a crash never leaves a
truncated `last.ckpt` that a resume would then fail on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from migm.models.assets import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write_bytes(Path(path), lambda tmp: torch.save(checkpoint, tmp))
