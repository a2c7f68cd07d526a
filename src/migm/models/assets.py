"""Shipped checkpoints: small weight files inside the package, verified against a manifest.

Each asset is a `torch.save`d dict {"kind", "config", "state_dict"} with fp16 weights; the
manifest (assets/manifest.json) records its sha256, size, the command that made it, and the
metrics measured on it. Loading checks the hash first, so a truncated or edited file fails loudly
instead of producing subtly wrong samples.

How a name is resolved (the same rule everywhere a weight file is named):
- a path that exists is that file, always (relative to the working directory or absolute);
- otherwise a bare name (no directory part) listed in the package manifest is that asset;
- anything else is a CheckpointError naming it. `mine/base.pt` is never the shipped base.pt.
Any file with a manifest.json beside it that lists its name (the package assets, and every file
`save_checkpoint` wrote) is hash-checked, whichever way it was named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from migm.files import CheckpointError, atomic_write_bytes, first_nonfinite, sha256

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def read_manifest(asset_dir: Path = ASSET_DIR) -> dict[str, Any]:
    path = Path(asset_dir) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _is_bare(name_or_path: str | Path) -> bool:
    raw = os.fspath(name_or_path)
    return "/" not in raw and os.sep not in raw


def resolve_checkpoint(name_or_path: str | Path, asset_dir: Path = ASSET_DIR) -> Path:
    """The file a weight name means: an existing path is that file; otherwise a bare manifest
    name is the shipped asset; otherwise CheckpointError."""
    path, asset_dir = Path(name_or_path), Path(asset_dir)
    shipped = read_manifest(asset_dir)
    if path.exists():
        if _is_bare(name_or_path) and path.name in shipped and not (
                (asset_dir / path.name).exists() and path.samefile(asset_dir / path.name)):
            log.warning("%s: loading the file in the working directory (%s), not the shipped asset "
                        "of that name", name_or_path, path.resolve())
        return path
    if _is_bare(name_or_path) and path.name in shipped:
        return asset_dir / path.name
    hint = (f"not a file, nor a shipped asset name ({', '.join(sorted(shipped)) or 'none'})"
            if _is_bare(name_or_path) else "no such file")
    raise CheckpointError(
        f"checkpoint {os.fspath(name_or_path)} not found: {hint}. The embedded default's "
        "weights ship in src/migm/assets; rebuild them with `make base`.")


def checkpoint_digest(name_or_path: str | Path, asset_dir: Path = ASSET_DIR) -> str:
    """sha256 of the file a weight name means (see resolve_checkpoint); for a checkpoint
    directory (Lumina-DiMOO), sha256 over its files' relative names and sha256s (hidden entries,
    such as a hub cache, left out). Provenance records this, never the name."""
    path = resolve_checkpoint(name_or_path, asset_dir)
    if not path.is_dir():
        return sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    lines = "".join(f"{p.relative_to(path).as_posix()}\t{sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_checkpoint(name_or_path: str | Path, kind: str, asset_dir: Path = ASSET_DIR) -> dict:
    """Load a weight file by name or path (see resolve_checkpoint), checking its sha256 against
    the manifest beside it when there is one, and its `kind`."""
    path = resolve_checkpoint(name_or_path, asset_dir)
    beside = read_manifest(path.parent)
    entry = beside.get(path.name) if isinstance(beside, dict) else None
    if isinstance(entry, dict) and "sha256" in entry:
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                f"{entry['sha256'][:12]}...; the file is corrupt or was replaced. Restore it with "
                "`git checkout -- src/migm/assets` or rebuild with `make base`.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(err).__name__}): "
                              "expected a torch.save'd dict of weights") from err
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
    """Write an fp16 asset atomically and record it in the manifest beside it; returns sha256.
    Non-finite weights are refused: an asset is never written from a diverged run."""
    path = Path(path)
    bad = first_nonfinite(state_dict.items())
    if bad is not None:
        raise CheckpointError(f"{path}: not written: tensor '{bad}' has NaN or infinite values")
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

