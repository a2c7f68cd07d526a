"""Shipped checkpoints: small weight files inside the package, verified against a manifest.

Each asset is a `torch.save`d dict {"kind", "config", "state_dict"} with fp16 weights; the
manifest (assets/manifest.json) records its sha256, size, the command that made it, and the
metrics measured on it. Loading checks the hash first, so a truncated or edited file fails loudly
instead of producing subtly wrong samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or not the kind that was asked for."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path) then rename onto `path`, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600; keep the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(asset_dir: Path = ASSET_DIR) -> dict[str, Any]:
    path = Path(asset_dir) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def load_checkpoint(name_or_path: str | Path, kind: str, asset_dir: Path = ASSET_DIR) -> dict:
    """Load a weight file by manifest name (e.g. 'base.pt') or by path, checking its sha256.

    A path outside the manifest is loaded without a hash check (it is the user's own file), but
    its `kind` must still match.
    """
    asset_dir = Path(asset_dir)
    path = Path(name_or_path)
    entry = read_manifest(asset_dir).get(path.name) if not path.is_absolute() else None
    if entry is not None or not path.exists():
        path = asset_dir / path.name if entry is not None else path
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {name_or_path!s} ({kind}) not found at {path}. The embedded default's "
            "weights ship in src/migm/assets; rebuild them with `make base`.")
    if entry is not None:
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                f"{entry['sha256'][:12]}...; the file is corrupt or was replaced. Restore it with "
                "`git checkout -- src/migm/assets` or rebuild with `make base`.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({err})") from err
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        got = blob.get("kind") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: field 'kind' is {got!r}, expected {kind!r}")
    return blob


def load_module(name_or_path: str | Path, kind: str, build: Callable[[dict], nn.Module],
                asset_dir: Path = ASSET_DIR) -> nn.Module:
    """Load a checked asset into the network `build(config)` makes; frozen, in eval mode, fp32."""
    blob = load_checkpoint(name_or_path, kind, asset_dir)
    module = build(blob["config"])
    try:
        module.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    except RuntimeError as err:
        raise CheckpointError(f"{name_or_path}: weights do not fit the {kind} network: {err}") from err
    return module.eval().requires_grad_(False)


def save_checkpoint(path: Path, kind: str, config: dict, state_dict: dict[str, torch.Tensor],
                    command: str, metrics: dict[str, float] | None = None) -> str:
    """Write an fp16 asset atomically and record it in the manifest beside it; returns sha256."""
    path = Path(path)
    small = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, lambda tmp: torch.save(
        {"kind": kind, "config": config, "state_dict": small}, tmp))
    digest = sha256(path)
    manifest = read_manifest(path.parent)
    manifest[path.name] = {"kind": kind, "sha256": digest, "bytes": path.stat().st_size,
                           "command": command, "metrics": metrics or {}}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path.parent / MANIFEST, lambda tmp: tmp.write_text(text))
    return digest

