"""Feature reuse: the training-free floor every learned shortcut has to beat.

At the refresh plan's base steps the base model runs; in between, the previous step's features are
used again unchanged, f_i = f_{i-1}. It is what an untrained (zero-initialised) shortcut computes,
at no cost, so the gap between it and the shortcut at the same (N, B) is what training bought.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from migm.accel.method import PlannedMethod
from migm.accel.refresh import PlannedSource
from migm.sampling.loop import StepContext


class ReuseSource(PlannedSource):
    kind = "reused"

    def between(self, ctx: StepContext) -> torch.Tensor:
        return ctx.prev_features


@dataclass
class Reuse(PlannedMethod):
    """Feature reuse (FORA-like) on a refresh plan: the training-free floor. Give it the same
    plan and temperature as the shortcut it is compared with, so only the filler differs."""

    name: ClassVar[str] = "reuse"

    def source(self, model, shortcut, steps: int, budgets: int, **knobs):
        return ReuseSource(model, self.refresh_plan(steps, budgets), self.temperature)
