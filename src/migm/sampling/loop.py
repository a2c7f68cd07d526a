"""The one generation loop. Every method (vanilla, shortcut, caches) is a feature source.

At step i = 1..N the loop asks its source for f_i, the last-layer features of x_{i-1} for every
CFG branch; the base head turns them into logits, guidance mixes the branches, the sampler fills
the scheduled number of masked positions, and observers see the step. Sources differ only in
how f_i is obtained, so speed and quality comparisons run on exactly the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from migm.sampling.sampler import SamplerConfig, guide, sample_step
from migm.sampling.schedule import masked_counts


@dataclass
class StepContext:
    """What a feature source may use at step i. Rows are stacked [cond; uncond] when CFG is on."""

    step: int                            # i, 1-based
    steps: int                           # N
    t: float                             # t_{i-1} = (i-1)/N: time of the grid the features describe
    mask_ratio: float                    # fraction of positions still masked in x_{i-1}
    tokens: torch.Tensor                 # x_{i-1}, (branches*B, L)
    cond: torch.Tensor                   # (branches*B,), null condition in the second half
    prev_features: torch.Tensor | None   # f_{i-1}, (branches*B, L, D); None at step 1
    revealed: torch.Tensor | None        # positions decoded at step i-1, (branches*B, L) bool
    schedule: tuple[int, ...] = ()       # M_0..M_N: positions still masked after j steps
    branches: int = 1                    # CFG branches stacked in the rows (2: [cond; uncond])
    seed: int = 0                        # the loop's seed: for a source's own noise, drawn apart
                                         # from the loop's generator (which stays the same for all)


class FeatureSource(Protocol):
    """Optionally also `step_temperature`: read after each call, it divides that step's guided
    logits (an accelerator's calibration of the features it extrapolated; 1 when absent), a
    float or a (B, 1, 1) tensor where samples of one step differ (accel/adaptive.py); and
    `eligible`: read after each call, None or (B or branches*B, L) bool, the only positions this
    step may fill (ReCAP's group); the count filled stays the schedule's."""

    def reset(self) -> None:
        """Forget per-trajectory state before a new batch is generated."""

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Return f_i, (branches*B, L, D)."""


class Observer(Protocol):
    def on_step(self, ctx: StepContext, features: torch.Tensor, new_tokens: torch.Tensor,
                revealed: torch.Tensor) -> None:
        """Called after step i with f_i, x_i (B, L) and the positions filled at step i (B, L)."""


@dataclass
class GenerationResult:
    tokens: torch.Tensor                 # x_N, (B, L): no mask left
    decode_step: torch.Tensor            # (B, L) int: step 1..N at which each position was filled
    counts: dict[str, int] = field(default_factory=dict)  # calls made, as reported by the source


class VanillaSource:
    """The base model at every step: the reference every accelerator is measured against."""

    def __init__(self, model) -> None:
        self.model = model
        self.base_calls = 0

    def reset(self) -> None:
        self.base_calls = 0

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        self.base_calls += 1
        return self.model.features(ctx.tokens, ctx.cond)

    def counts(self) -> dict[str, int]:
        return {"base_calls": self.base_calls, "shortcut_calls": 0}


def revealable(masked: torch.Tensor, eligible: torch.Tensor | None, n_reveal: int) -> torch.Tensor:
    """The positions (B, M) the sampler may fill this step: every masked one, or the masked ones
    a source marked eligible. Rows must agree on M (the sampler works on a (B, M) block) and have
    at least the n_reveal the schedule asks for."""
    B, L = masked.shape
    if eligible is None:                                  # the common path: no extra checks
        return masked.nonzero()[:, 1].view(B, -1)
    if eligible.dim() != 2 or eligible.shape[1] != L or eligible.shape[0] % B:
        raise ValueError(f"source.eligible must be (B or branches*B, L) = ({B}, {L}) bool, got "
                         f"{tuple(eligible.shape)}")
    if eligible.shape[0] != B:
        if not (eligible.view(-1, B, L) == eligible[:B]).all():
            raise ValueError("source.eligible differs between CFG branches of one sample")
        eligible = eligible[:B]
    masked = masked & eligible.to(device=masked.device, dtype=torch.bool)
    per_row = masked.sum(1)
    if (per_row != per_row[0]).any() or int(per_row[0]) < n_reveal:
        raise ValueError(f"source.eligible leaves {per_row.tolist()} masked positions per row; this "
                         f"step must fill {n_reveal} in every row (and rows must agree)")
    return masked.nonzero()[:, 1].view(B, -1)


@torch.no_grad()
def generate(model, source: FeatureSource, cond: torch.Tensor, steps: int, *,
             schedule: str = "arccos", sampler: SamplerConfig | None = None, seed: int = 0,
             observers: Sequence[Observer] = ()) -> GenerationResult:
    """Generate token grids for conditions `cond` (B,) in `steps` steps.

    Deterministic given `seed`: all randomness comes from one generator, consumed identically by
    every source, so two methods run with one seed differ only through their features.
    """
    sampler = sampler or SamplerConfig()
    sampler.check_steps(steps)
    model.check_condition(cond)
    B, Lt, mask_id = cond.shape[0], model.num_tokens, model.mask_id
    counts = masked_counts(Lt, steps, schedule)
    device = cond.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stacked_cond = cond if sampler.branches == 1 else torch.cat([cond, model.null_condition(cond)])

    tokens = torch.full((B, Lt), mask_id, dtype=torch.long, device=device)
    decode_step = torch.zeros((B, Lt), dtype=torch.long, device=device)
    features, revealed = None, None

    def stack(x: torch.Tensor) -> torch.Tensor:  # the same grid for every CFG branch
        return x if sampler.branches == 1 else torch.cat([x, x])

    plan = tuple(int(c) for c in counts)
    source.reset()
    for i in range(1, steps + 1):
        ctx = StepContext(step=i, steps=steps, t=(i - 1) / steps, mask_ratio=counts[i - 1] / Lt,
                          tokens=stack(tokens), cond=stacked_cond, prev_features=features,
                          revealed=None if revealed is None else stack(revealed),
                          schedule=plan, branches=sampler.branches, seed=seed)
        features = source(ctx)                                              # (branches*B, L, D)
        # the M positions this step may fill (every masked one unless the source narrows them)
        masked_pos = revealable(tokens == mask_id, getattr(source, "eligible", None),
                                counts[i - 1] - counts[i])                              # (B, M)
        positions = stack(masked_pos)                                   # (branches*B, M)
        index = positions.unsqueeze(-1).expand(-1, -1, features.shape[-1])
        scored = model.head(features.gather(1, index), positions=positions)  # (branches*B, M, K)
        weight = sampler.guidance_weight(i, steps)      # w, or the reference's ramp w (i-1)/(N-1)
        logits = guide(scored, weight, sampler.branches)                           # (B, M, K)
        logits = logits / getattr(source, "step_temperature", 1.0)
        drawn, keep = sample_step(logits, counts[i - 1] - counts[i], ctx.t, sampler, generator,
                                  step=i, steps=steps)
        revealed = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, masked_pos, keep)
        tokens = tokens.scatter(1, masked_pos, torch.where(keep, drawn, mask_id))
        decode_step[revealed] = i
        for obs in observers:
            obs.on_step(ctx, features, tokens, revealed)
    report = getattr(source, "counts", None)
    return GenerationResult(tokens, decode_step, report() if report else {})
