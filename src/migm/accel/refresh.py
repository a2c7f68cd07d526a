"""Refresh plans: at which of the N steps an accelerator calls the full base model.

The paper's plan is uniform: with budget B the base runs at steps 1 + floor(jN/B), j = 0..B-1,
so step 1 (the all-mask grid, where there is no previous feature to extrapolate) always gets the
base. The released shortcut code rounds instead of flooring (`official`), which moves some base
calls one step later (15/7: 1,3,5,7,10,12,14 against the floor's 1,3,5,7,9,11,13). A plan is its
own small object so other schedules (front-loaded, adaptive) slot in beside them.

Reference facts this relies on: Kaiwen-Zhu/MIGM-Shortcut@93349c4
MaskGIT-Shortcut/Trainer/vit.py `sample_shortcut` (l.483-496) and DiMOO-Shortcut/generators/
image_generation_generator.py `generate_image_shortcut` (l.407-419): 0-indexed, refresh[0] = True,
then s_k = max(s_{k-1} + 1, round(N * (k / B))) for k = 1..B-1 with Python's round (half to even)
on the float N * (k / B); it asserts B >= 2 and that B steps result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from migm.sampling.loop import FeatureSource, StepContext, StepOutput

PlanName = Literal["uniform", "front_loaded", "official"]
PLANS: tuple[str, ...] = get_args(PlanName)


@dataclass(frozen=True)
class RefreshPlan:
    """The set of steps (1-based) at which the base model runs."""

    steps: int
    base_steps: frozenset[int]

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if 1 not in self.base_steps:
            raise ValueError(f"the base must run at step 1 (no features exist before it); got "
                             f"{sorted(self.base_steps)}")
        outside = [s for s in self.base_steps if not 1 <= s <= self.steps]
        if outside:
            raise ValueError(f"base steps {sorted(outside)} lie outside 1..{self.steps}")

    @classmethod
    def uniform(cls, steps: int, budget: int) -> RefreshPlan:
        """The paper's plan: base at 1 + floor(j * N / B) for j = 0..B-1."""
        if not 1 <= budget <= steps:
            raise ValueError(f"budget B must satisfy 1 <= B <= N={steps}, got {budget}")
        return cls(steps, frozenset(1 + (j * steps) // budget for j in range(budget)))

    @classmethod
    def official(cls, steps: int, budget: int) -> RefreshPlan:
        """The MIGM-Shortcut code's plan: 0-indexed s_0 = 0, s_k = max(s_{k-1} + 1,
        round(N k / B)), base at s_k + 1. B = 1 gives step 1 alone (the reference asserts B >= 2).
        """
        if not 1 <= budget <= steps:
            raise ValueError(f"budget B must satisfy 1 <= B <= N={steps}, got {budget}")
        base = [0]
        for k in range(1, budget):
            base.append(max(base[-1] + 1, round(steps * (k / budget))))
        return cls(steps, frozenset(s + 1 for s in base))

    @classmethod
    def named(cls, plan: str, steps: int, budget: int, power: float = 1.0) -> RefreshPlan:
        """A plan chosen by name in a config: "uniform" (the paper), "official" (the released
        code), or "front_loaded" (with `power`; power 1 is uniform)."""
        if plan == "uniform":
            return cls.uniform(steps, budget)
        if plan == "official":
            return cls.official(steps, budget)
        if plan == "front_loaded":
            return cls.front_loaded(steps, budget, power)
        raise ValueError(f"plan must be one of {list(PLANS)}, got {plan!r}")

    @classmethod
    def explicit(cls, steps: int, base_steps: list[int]) -> RefreshPlan:
        return cls(steps, frozenset(base_steps))

    @classmethod
    def front_loaded(cls, steps: int, budget: int, power: float) -> RefreshPlan:
        """Base at 1 + floor(N (j/B)^power), j = 0..B-1: power 1 is the paper's uniform plan,
        power > 1 spends more base calls early. Early steps fix the image's layout and every
        later step builds on them, so an extrapolation error there costs the most (README: the
        plan measured). Colliding steps are moved one later, so the plan keeps B distinct steps.
        """
        if not 1 <= budget <= steps:
            raise ValueError(f"budget B must satisfy 1 <= B <= N={steps}, got {budget}")
        if power < 1:
            raise ValueError(f"power must be >= 1 (1 = uniform), got {power}")
        if power == 1:
            return cls.uniform(steps, budget)
        base = [1]
        for j in range(1, budget):
            at = 1 + int(steps * (j / budget) ** power + 1e-9)
            base.append(min(max(at, base[-1] + 1), steps - (budget - 1 - j)))
        return cls(steps, frozenset(base))

    @property
    def budget(self) -> int:
        return len(self.base_steps)

    def uses_base(self, step: int) -> bool:
        return step in self.base_steps


class PlannedSource(FeatureSource):
    """A feature source that runs the base at the plan's steps and `between(ctx)` at the others;
    subclasses say what happens between base steps (a learned shortcut, plain reuse, ...) and
    which counter those steps add to (`kind`)."""

    kind = "shortcut_calls"

    def __init__(self, model, plan: RefreshPlan, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.model, self.plan, self.steps = model, plan, plan.steps

    def step(self, ctx: StepContext) -> StepOutput:
        if self.plan.uses_base(ctx.step) or ctx.prev_features is None:
            return StepOutput(self.base_features(ctx))
        return StepOutput(self.between(ctx), full=False, kind=self.kind)

    def base_features(self, ctx: StepContext) -> torch.Tensor:
        return self.model.features(ctx.tokens, ctx.cond)

    def between(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError
