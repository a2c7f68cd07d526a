"""A shortcut that evolves the base's whole-sequence state, as a feature source for the one loop.

At the plan's base steps the source calls `sequence_features` and keeps the full state; at the
other steps it builds the SequenceStep of x_{i-1} (the step's new tokens scattered from grid to
sequence positions, shortcut/sequence.py), runs the network, keeps its output as the state;
either way it returns the state at the grid, (R, L, D), to the loop. R = branches * B, rows
stacked [cond; uncond] as everywhere in the loop; both branches go through one network call,
each with its own state. The loop stays the same; only what the source keeps between steps grows.
"""

from __future__ import annotations

import torch

from migm.accel.refresh import PlannedSource, RefreshPlan
from migm.sampling.loop import StepContext
from migm.shortcut.sequence import gather_grid, sequence_step


class SequenceShortcutSource(PlannedSource):
    """The base at the plan's steps, a sequence shortcut (`positions == "sequence"`) between."""

    def __init__(self, model, shortcut, plan: RefreshPlan, temperature: float = 1.0) -> None:
        if getattr(shortcut, "positions", "grid") != "sequence":
            raise ValueError(f"{type(shortcut).__name__} maps grid features: use ShortcutSource "
                             f"(accel/shortcut.py), not SequenceShortcutSource")
        missing = [m for m in ("sequence", "sequence_features") if not hasattr(model, m)]
        if missing:
            raise ValueError(f"base {type(model).__name__} lacks {missing}: a sequence shortcut "
                             f"needs the base's whole-sequence state")
        if shortcut.config.feature_dim != model.feature_dim:
            raise ValueError(f"shortcut feature_dim {shortcut.config.feature_dim} != base model "
                             f"feature_dim {model.feature_dim}")
        super().__init__(model, plan, temperature)
        self.shortcut = shortcut
        self.states: torch.Tensor | None = None            # (R, T, D) the last step's state

    def reset(self) -> None:
        self.states = None

    def base_features(self, ctx: StepContext) -> torch.Tensor:
        _, _, grid = self.model.sequence(ctx.tokens, ctx.cond)
        self.states = self.model.sequence_features(ctx.tokens, ctx.cond)          # (R, T, D)
        return gather_grid(self.states, grid)

    def between(self, ctx: StepContext) -> torch.Tensor:
        R, device = len(ctx.tokens), ctx.tokens.device
        step = sequence_step(self.model, self.states, ctx.tokens, ctx.cond, ctx.revealed,
                             torch.full((R,), ctx.mask_ratio, device=device),
                             torch.full((R,), ctx.t, device=device))
        step.new_count = ctx.new_count
        self.states = self.shortcut.step(step).to(self.states.dtype)
        return gather_grid(self.states, step.grid)
