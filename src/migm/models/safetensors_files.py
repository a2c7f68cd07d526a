"""Reading released checkpoints stored as safetensors (Lumina-DiMOO, its VQ model, its shortcut):
tensors read and cast one at a time, shapes checked from the file headers before any is read,
and a file that does not fit named with its first missing, unexpected or mis-shaped keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from migm.files import CheckpointError
from migm.models.checkpoints import HOW_TO_GET


def need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"Lumina-DiMOO {what} not found at {path}. {HOW_TO_GET['dimoo']}.")
    return path


def shard_map(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (sharded with an index, or one file)."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        for f in sorted(set(files.values())):
            need_file(f, f"weight shard listed in {index.name}")
        return files
    return dict.fromkeys(tensor_keys(need_file(single, "model.safetensors.index.json (or model.safetensors)")),
                         single)


def tensor_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return list(f.keys())


def read_tensors(files: dict[str, tuple[Path, str]], shapes_only: bool = False,
          dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    """{our key: (file, its key there)} -> shapes from the headers, or tensors read and cast one
    at a time (an 8B checkpoint never sits in memory twice)."""
    from safetensors import safe_open

    out, by_file = {}, {}
    for ours, (f, theirs) in files.items():
        by_file.setdefault(f, []).append((ours, theirs))
    for f, pairs in by_file.items():
        with safe_open(f, "pt") as h:
            for ours, theirs in pairs:
                out[ours] = (tuple(h.get_slice(theirs).get_shape()) if shapes_only
                             else h.get_tensor(theirs).to(device=device, dtype=dtype))
    return out


def check_fit(where: Path, what: str, found: dict, expected: dict, summary: str) -> None:
    """Raise naming the first keys that are missing, unexpected, or of the wrong shape."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: file {tuple(found[k])}, expected {tuple(s)}"
              for k, s in expected.items() if k in found and tuple(found[k]) != tuple(s)]
    problems = [f"{name} {items[:4]}{' ...' if len(items) > 4 else ''}"
                for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if items]
    if problems:
        raise CheckpointError(f"{where}: does not fit the {what} of this config ({summary}): "
                              + "; ".join(problems) + ".")


def load_checked(model: nn.Module, files: dict, where: Path, what: str, summary: str,
          dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """`model` built on the meta device: check names and shapes from the file headers, then read."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_fit(where, what, read_tensors(files, shapes_only=True), expected, summary)
    model.load_state_dict(read_tensors(files, dtype=dtype, device=device), assign=True)
    return model.eval().requires_grad_(False)
