"""The shortcut as a feature source for the shared generation loop (paper Sec. 3.5).

At the plan's base steps f_i comes from the base model; at every other step it is extrapolated
from the previous step's features and the tokens that step decoded: f_i = f_{i-1} + S(f_{i-1},
new tokens, t_{i-1}). Both CFG branches take the same path, so guidance sees consistent features.
The shortcut may have been trained on trajectories of another step count: it is told the time t,
not the step index, so a model trained at N=16 runs at N=32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from migm.accel.method import PlannedMethod
from migm.accel.refresh import PlannedSource, RefreshPlan
from migm.accel.sequence import SequenceShortcutSource
from migm.sampling.loop import StepContext
from migm.shortcut.network import ShortcutNetwork, time_input


class ShortcutSource(PlannedSource):
    """`step_scale` s takes f_{i-1} + s (S(f_{i-1}, ...) - f_{i-1}): 1 is the shortcut, 0 is
    feature reuse; in between shrinks the learned change towards "features do not move"."""

    def __init__(self, model, shortcut: ShortcutNetwork, plan: RefreshPlan, temperature: float = 1.0,
                 step_scale: float = 1.0) -> None:
        if shortcut.config.feature_dim != model.feature_dim:
            raise ValueError(f"shortcut feature_dim {shortcut.config.feature_dim} != base model "
                             f"feature_dim {model.feature_dim}")
        super().__init__(model, plan, temperature)
        self.shortcut, self.step_scale = shortcut, step_scale

    def between(self, ctx: StepContext) -> torch.Tensor:
        out = shortcut_step(self.shortcut, ctx)
        return out if self.step_scale == 1.0 else torch.lerp(ctx.prev_features, out, self.step_scale)


def shortcut_step(shortcut: ShortcutNetwork, ctx: StepContext) -> torch.Tensor:
    """f_i = f_{i-1} + S(f_{i-1}, tokens decoded at step i-1, t) for every row (R, L, D): the
    grid the previous features describe is x_{i-2}; the shortcut steps it to x_{i-1}."""
    rows, device = len(ctx.tokens), ctx.tokens.device
    time = time_input(shortcut, torch.full((rows,), ctx.t, device=device),
                      torch.full((rows,), ctx.mask_ratio, device=device))
    return shortcut(ctx.prev_features, ctx.tokens, ctx.revealed, time, new_count=ctx.new_count)

def shortcut_source(model, shortcut, plan: RefreshPlan, temperature: float = 1.0) -> PlannedSource:
    """The source a trained shortcut runs in: a sequence-state network over a base that has a
    sequence (MaskGIT's class slot, DiMOO's prompt) in SequenceShortcutSource; any other pair in
    ShortcutSource on grid features (the embedded default's sequence is its grid)."""
    if getattr(shortcut, "positions", "grid") == "sequence" and hasattr(model, "sequence_features"):
        return SequenceShortcutSource(model, shortcut, plan, temperature)
    return ShortcutSource(model, shortcut, plan, temperature)


@dataclass
class Shortcut(PlannedMethod):
    """The learned shortcut between the plan's base steps (MIGM-Shortcut). Fields: see
    PlannedMethod, plus `step_scale` (1: the shortcut's change as predicted; 0: feature reuse;
    between: the change shrunk, grid-feature networks only). The network comes from `test`'s
    weights (--ckpt_path or --model.init_args.test_weights), not from this config."""

    step_scale: float = 1.0

    name: ClassVar[str] = "shortcut"
    needs_shortcut: ClassVar[bool] = True

    def check(self, steps: int, budgets: int, **knobs) -> None:
        super().check(steps, budgets, **knobs)
        if not 0 <= self.step_scale <= 2:
            raise ValueError(f"Shortcut.step_scale: must lie in [0, 2] (1 = as predicted), got {self.step_scale}")

    def source(self, model, shortcut, steps: int, budgets: int, **knobs):
        if shortcut is None:
            raise ValueError(f"shortcut N{steps}/B{budgets}: needs shortcut weights (--ckpt_path)")
        source = shortcut_source(model, shortcut, self.refresh_plan(steps, budgets), self.temperature)
        if self.step_scale != 1.0:
            if not isinstance(source, ShortcutSource):
                raise ValueError("Shortcut.step_scale: only grid-feature shortcuts can be shrunk")
            source.step_scale = self.step_scale
        return source
