"""Reading a Lightning training checkpoint without trusting arbitrary pickles, and saying what a
wrong file is instead of failing deep inside torch.

A `.ckpt` written by `migm fit` holds plain tensors plus migm's own config dataclasses (the
module's hyperparameters: ShortcutConfig, GridConfig, Shortcut, ...). torch's `weights_only`
loader refuses those classes, and its message advises `weights_only=False`, which would run any
code a file carries. Here only migm's own classes are allowed on top of plain tensors.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from migm.models.assets import CheckpointError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def _migm_globals(path: Path) -> list:
    """The classes the file pickles, each checked to be one of migm's own."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    foreign = [n for n in names if not n.startswith("migm.")]
    if foreign:
        raise CheckpointError(f"{path}: pickles classes outside migm ({', '.join(foreign[:3])}); "
                              "a migm checkpoint holds only tensors and migm's configs")
    out = []
    for name in names:
        module, attr = name.rsplit(".", 1)
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError) as err:
            raise CheckpointError(f"{path}: written by another version of migm ({name} no longer "
                                  "exists)") from err
    return out


def describe_wrong_file(path: Path) -> str | None:
    """What `path` is when it is plainly not a Lightning checkpoint, else None."""
    if not path.is_file():
        return f"{path}: no such file" if not path.exists() else f"{path}: is a directory, not a checkpoint file"
    head = path.read_bytes()[:8] if path.stat().st_size else b""
    if not head:
        return f"{path}: is empty (0 bytes), expected a Lightning .ckpt written by `migm fit`"
    if head.startswith(HDF5_MAGIC):
        return (f"{path}: is an HDF5 file (a trajectory shard?), expected a Lightning .ckpt written "
                "by `migm fit`")
    if not head.startswith(ZIP_MAGIC):
        return f"{path}: is not a torch checkpoint (unknown format), expected a Lightning .ckpt written by `migm fit`"
    return None


def load_lightning_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, loaded with tensors and migm's own classes only; a wrong file (a
    shard, an empty file, a shipped asset, a foreign pickle) is a one-line CheckpointError."""
    path = Path(path)
    if (wrong := describe_wrong_file(path)) is not None:
        raise CheckpointError(wrong)
    try:
        with torch.serialization.safe_globals(_migm_globals(path)):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:                       # truncated zip, unreadable records, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first[:160]})") from err
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: holds a {type(blob).__name__}, expected a Lightning checkpoint dict")
    if "kind" in blob and "pytorch-lightning_version" not in blob:
        raise CheckpointError(f"{path}: is a migm asset (kind {blob['kind']!r}), not a training "
                              "checkpoint: for `test` pass it as --model.init_args.test_weights")
    if "state_dict" not in blob or "pytorch-lightning_version" not in blob:
        raise CheckpointError(f"{path}: has no 'state_dict'/'pytorch-lightning_version': not a "
                              "Lightning checkpoint written by `migm fit`")
    return blob
