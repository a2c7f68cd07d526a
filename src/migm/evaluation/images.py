"""Sample grids as PNG: the picture people look at before any number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from migm.data.images import to_uint8
from migm.files import atomic_write_bytes


def image_grid(images: torch.Tensor, rows: int, pad: int = 2) -> np.ndarray:
    """images (rows*cols, C, H, W) in [-1, 1] -> uint8 (rows*(H+pad), cols*(W+pad), C)."""
    if len(images) % rows:
        raise ValueError(f"{len(images)} images do not fill {rows} rows")
    x = to_uint8(images)
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=255)
    return rearrange(x, "(r c) ch h w -> (r h) (c w) ch", r=rows).numpy()


def save_grid(images: torch.Tensor, rows: int, path: str | Path, scale: int = 3) -> Path:
    """Write a grid PNG atomically, upscaled by `scale` (nearest) so 28 px digits stay visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, rows)
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    path = Path(path)
    atomic_write_bytes(path, lambda tmp: plt.imsave(tmp, grid, cmap="gray", vmin=0, vmax=255,
                                                    format="png"))
    return path
