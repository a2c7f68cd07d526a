"""Adaptive refresh: the shortcut's own predicted change decides, per sample, when the base runs.

A refresh plan spends the B base calls at the same steps for every sample, although how far the
features move between steps differs from image to image. Here every sample still gets exactly B
base calls (the plan's cost), but spends them where the shortcut predicts its features moved
most since its last base call: at each step the shortcut predicts f_i for every row, a sample's
drift (the sum, since its last base call, of the predicted relative change ||S(f) - f|| / ||f||
over the still-masked positions) is compared with `threshold`, and a sample over it gets the
base for its rows. A sample with as many calls left as steps left gets the base at each of them,
so each spends exactly B. The signal costs nothing extra: the prediction is the features of the
samples that do not refresh (an adaptive refresh at the same budget as a plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from migm.accel.method import Method
from migm.accel.shortcut import shortcut_step
from migm.sampling.loop import FeatureSource, StepContext, StepOutput


def predicted_change(prev: torch.Tensor, predicted: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """||predicted - prev|| / ||prev|| per row over the masked positions: prev, predicted (R, L, D),
    masked (R, L) bool -> (R,)."""
    keep = masked.unsqueeze(-1).to(prev.dtype)
    change = ((predicted - prev) * keep).flatten(1).norm(dim=1)
    return change / (prev * keep).flatten(1).norm(dim=1).clamp_min(1e-12)


class AdaptiveShortcutSource(FeatureSource):
    """The shortcut between base calls whose timing each sample chooses (see the module).

    Each step's output says per sample whether the base served it (`full`, (B,) bool), so the
    loop tempers exactly the samples the shortcut served and counts base calls per sample."""

    def __init__(self, model, shortcut, steps: int, budget: int, threshold: float,
                 temperature: float = 1.0) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if shortcut.config.feature_dim != model.feature_dim:
            raise ValueError(f"shortcut feature_dim {shortcut.config.feature_dim} != base model "
                             f"feature_dim {model.feature_dim}")
        super().__init__(temperature)
        self.model, self.shortcut, self.steps = model, shortcut, steps
        self.budget, self.threshold = budget, threshold
        self.reset()

    def reset(self) -> None:
        self.left = self.drift = None                    # (B,) base calls left, drift since the last

    def step(self, ctx: StepContext) -> StepOutput:
        n, device = len(ctx.tokens) // ctx.branches, ctx.tokens.device
        if ctx.prev_features is None:                     # step 1: every sample needs the base
            self.left = torch.full((n,), self.budget - 1, device=device)
            self.drift = torch.zeros(n, device=device)
            return StepOutput(self.model.features(ctx.tokens, ctx.cond),
                              full=torch.ones(n, dtype=torch.bool, device=device))
        predicted = shortcut_step(self.shortcut, ctx)                               # (R, L, D)
        change = predicted_change(ctx.prev_features, predicted, ctx.tokens == self.model.mask_id)
        self.drift += change.view(ctx.branches, n).mean(0)                          # (B,)
        steps_left = ctx.steps - ctx.step + 1                                       # this one included
        call = (self.left > 0) & ((self.drift >= self.threshold) | (self.left >= steps_left))
        features = predicted
        if call.any():          # the one host sync of this method: the base runs on a subset
            rows = call.repeat(ctx.branches)              # both CFG branches of a chosen sample
            features = predicted.clone()
            features[rows] = self.model.features(ctx.tokens[rows], ctx.cond[rows])
        self.left -= call.long()
        self.drift = torch.where(call, 0.0, self.drift)
        return StepOutput(features, full=call, kind="shortcut_calls")


@dataclass
class AdaptiveShortcut(Method):
    """The shortcut with B base calls per sample placed by its own predicted drift (module doc).

    Args:
        budgets: B, base calls per sample (1 <= B < N), exactly spent.
        threshold: the drift (summed predicted relative change since the last base call) at
            which a sample refreshes; 0 spends the calls at the first steps, a large value leaves
            them to the last.
        temperature: divides the logits of the samples the shortcut serves at a step.
    """

    budgets: list[int] = field(default_factory=lambda: [8])
    threshold: list[float] = field(default_factory=lambda: [0.5])

    name: ClassVar[str] = "adaptive"
    needs_shortcut: ClassVar[bool] = True

    def check(self, steps: int, budgets: int, threshold: float, **knobs) -> None:
        super().check(steps)
        if not 1 <= budgets < steps:
            raise ValueError(f"AdaptiveShortcut.budgets: B must satisfy 1 <= B < N, got B={budgets} for N={steps}")
        if threshold < 0:
            raise ValueError(f"AdaptiveShortcut.threshold: must be >= 0, got {threshold}")

    def label(self, steps: int, budgets: int, threshold: float, **knobs) -> str:
        return f"N{steps}/B{budgets} d{threshold:g}"

    def source(self, model, shortcut, steps: int, budgets: int, threshold: float, **knobs):
        if shortcut is None:
            raise ValueError(f"adaptive N{steps}/B{budgets}: needs shortcut weights (--ckpt_path)")
        if getattr(shortcut, "positions", "grid") == "sequence":
            raise ValueError("AdaptiveShortcut: grid-feature shortcuts only (not a sequence-state network)")
        return AdaptiveShortcutSource(model, shortcut, steps, budgets, threshold, self.temperature)
