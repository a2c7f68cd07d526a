"""torch.compile for the two networks a generation calls at every step: the base's blocks and the
shortcut.

Why blocks and not the whole adapter: at a full pass every block sees the same (B, T, D) at every
step, so one graph (`dynamic=False`, `fullgraph=True`: no graph break, no recompile per step)
serves every block and every step, while what changes shape from step to step (the sampler over
the masked positions, guidance, the caches' row gathers) stays eager. The caches (ML-Cache,
ReCAP, dLLM-Cache, per-layer TaylorSeer) call a block's parts (`project`, `mlp_branch`, ...), not
its forward: they run eager either way, and `migm speed --compile true` times them so.

The compiled twins share their weights with the eager modules (torch.compile wraps, it does not
copy), so a study can time both on one set of weights, in the same rounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CompiledTwins:
    """The compiled twin of every block of one base, and of the shortcut (None: no shortcut)."""

    blocks: list[nn.Module]
    shortcut: nn.Module | None


def compile_twins(model, shortcut: nn.Module | None = None, *, backend: str = "inductor",
                  mode: str | None = None) -> CompiledTwins:
    """Compiled twins of `model.layers()` and of `shortcut` (compiled lazily, at their first call)."""
    options = {"backend": backend, "mode": mode, "fullgraph": True, "dynamic": False}
    return CompiledTwins([torch.compile(block, **options) for block in model.layers()],
                         None if shortcut is None else torch.compile(shortcut, **options))


@contextmanager
def using_twins(model, twins: CompiledTwins) -> Iterator[None]:
    """Inside: `model`'s blocks are their compiled twins (the adapter's loop over its blocks calls
    them); outside, the eager blocks again, whatever happened inside."""
    layers = model.layers()
    eager = list(layers)
    if len(eager) != len(twins.blocks):
        raise ValueError(f"{len(twins.blocks)} compiled blocks for a base of {len(eager)}")
    try:
        for i, twin in enumerate(twins.blocks):
            layers[i] = twin
        yield
    finally:
        for i, block in enumerate(eager):
            layers[i] = block
