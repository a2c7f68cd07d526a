"""Feature reuse: the training-free floor every learned shortcut has to beat.

At the refresh plan's base steps the base model runs; in between, the previous step's features are
used again unchanged, f_i = f_{i-1}. It is what an untrained (zero-initialised) shortcut computes,
at no cost, so the gap between it and the shortcut at the same (N, B) is what training bought.
"""

from __future__ import annotations

import torch

from migm.accel.refresh import RefreshPlan
from migm.sampling.loop import StepContext


class ReuseSource:
    def __init__(self, model, plan: RefreshPlan) -> None:
        self.model, self.plan = model, plan
        self.base_calls = self.reused = 0

    def reset(self) -> None:
        self.base_calls = self.reused = 0

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        if ctx.steps != self.plan.steps:
            raise ValueError(f"refresh plan is for N={self.plan.steps} steps, the loop runs {ctx.steps}")
        if self.plan.uses_base(ctx.step) or ctx.prev_features is None:
            self.base_calls += 1
            return self.model.features(ctx.tokens, ctx.cond)
        self.reused += 1
        return ctx.prev_features

    def counts(self) -> dict[str, int]:
        return {"base_calls": self.base_calls, "shortcut_calls": 0, "reused": self.reused}
