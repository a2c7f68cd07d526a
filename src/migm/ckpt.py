"""Reading a Lightning training checkpoint without trusting arbitrary pickles, and saying what a
wrong file is instead of failing deep inside torch.

A `.ckpt` written by `migm fit` holds plain tensors and plain config (the network as
{"class_path", "init_args"}). Checkpoints of earlier versions also pickled migm's config
dataclasses (ShortcutConfig, GridConfig, the methods): torch's `weights_only` loader refuses
those, and its message advises `weights_only=False`, which would run any code a file carries.
Here only names under `migm.` are allowed on top of plain tensors, and each is rebuilt as a
plain record of its fields (`OldConfig`), never by running migm's current class: a class that
has since moved or been renamed still loads, and `plain()` turns it into dicts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from migm.files import CheckpointError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


class OldConfig:
    """A config object an older checkpoint pickled: its class name and fields, nothing else."""

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({vars(self)})"


def _record_class(name: str) -> type:
    module, attr = name.rsplit(".", 1)
    return type(attr, (OldConfig,), {"__module__": module, "__qualname__": attr})


def _migm_globals(path: Path) -> list:
    """A stand-in for each class the file pickles, each checked to be one of migm's."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    foreign = [n for n in names if not n.startswith("migm.")]
    if foreign:
        raise CheckpointError(f"{path}: pickles classes outside migm ({', '.join(foreign[:3])}); "
                              "a migm checkpoint holds only tensors and migm's configs")
    return [_record_class(name) for name in names]


def plain(value):
    """A checkpoint's hyperparameter as plain data: an old pickled config becomes
    {"class_path": its old name, "init_args": its fields}, recursively."""
    if isinstance(value, OldConfig):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {k: plain(v) for k, v in vars(value).items()}}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


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
                              "checkpoint: for `test` pass it as --evaluation.weights")
    if "state_dict" not in blob or "pytorch-lightning_version" not in blob:
        raise CheckpointError(f"{path}: has no 'state_dict'/'pytorch-lightning_version': not a "
                              "Lightning checkpoint written by `migm fit`")
    blob["hyper_parameters"] = plain(blob.get("hyper_parameters", {}))
    return blob
