"""The one generation loop. Every method (vanilla, shortcut, caches) is a feature source.

At step i = 1..N the loop asks its source for f_i, the last-layer features of x_{i-1} for every
CFG branch; the base head turns them into logits, guidance mixes the branches, the sampler fills
the scheduled number of masked positions, and observers see the step. Sources differ only in
how f_i is obtained, so speed and quality comparisons run on exactly the same code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
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

    @property
    def new_count(self) -> int | None:
        """How many positions every row decoded at step i-1 (the schedule says, so a network
        packing them need not ask the device); None at step 1 or without a schedule."""
        if self.step < 2 or len(self.schedule) < self.step:
            return None
        return self.schedule[self.step - 2] - self.schedule[self.step - 1]


@dataclass
class StepOutput:
    """What a feature source hands the loop at step i: everything that steers the step.

    `full` says whether the base computed f_i in full: True/False for the whole batch, or a (B,)
    bool tensor where samples of one step differ (accel/adaptive.py). The loop divides the
    guided logits by the source's skipped-step temperature exactly where `full` is False (once,
    here, for every method). `kind` names the counter a step that is not a full base call adds
    to (`shortcut_calls`, `reused`, `forecasts`, `partial_steps`, `local_steps`); `base_flops` is
    the share of one full base call's FLOPs the step spent (None: 1 if full, else 0), so every
    method reports the same counters. `eligible` (None, or (B or branches*B, L) bool) narrows the
    positions this step may fill (ReCAP's group); the count filled stays the schedule's."""

    features: torch.Tensor                       # f_i, (branches*B, L, D)
    full: bool | torch.Tensor = True             # bool, or (B,) bool per sample
    kind: str = "base_calls"                     # the counter a step that skips the base adds to
    base_flops: float | None = None              # share of a full base call spent at this step
    eligible: torch.Tensor | None = None         # (B or branches*B, L) bool, or None: every masked


class FeatureSource:
    """How f_i is obtained: the one thing methods differ in. Subclasses implement `step`.

    `temperature` divides the guided logits of the steps the source does not compute with a full
    base call (1 = off): extrapolated or stale features are over-confident (docs/results.md), so
    every training-free method gets the same knob. `step_temperatures` ({step: tau}, fitted by
    accel/calibration.py) overrides it at the steps it names. `steps`: the N the source was built
    for (None: any); the loop refuses another N."""

    steps: int | None = None

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:                           # NaN fails this too
            raise ValueError(f"temperature must be > 0 (1 = off), got {temperature}")
        self.temperature = temperature
        self.step_temperatures: dict[int, float] = {}

    def reset(self) -> None:
        """Forget per-trajectory state before a new batch is generated."""

    def step(self, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def skipped_temperature(self, step: int) -> float:
        return self.step_temperatures.get(step, self.temperature)

    def work(self) -> list | None:
        """What this run's steps did, where that depends on the values computed (None: nothing
        does). ML-Cache's partial steps recompute as many rows as tie at its threshold."""
        return None

    def repeat_work(self, work: list) -> None:
        """Do `work` (another run's `work()`) at the same steps, whatever this run's values say:
        composing a step's cost from two depths of the base needs both to do the same work."""


class Observer(Protocol):
    def on_step(self, ctx: StepContext, features: torch.Tensor, new_tokens: torch.Tensor,
                revealed: torch.Tensor) -> None:
        """Called after step i with f_i, x_i (B, L) and the positions filled at step i (B, L)."""


@dataclass
class GenerationResult:
    tokens: torch.Tensor                 # x_N, (B, L): no mask left
    decode_step: torch.Tensor            # (B, L) int: step 1..N at which each position was filled
    counts: dict[str, float] = field(default_factory=dict)  # summed from the steps' outputs


class VanillaSource(FeatureSource):
    """The base model at every step: the reference every accelerator is measured against."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def step(self, ctx: StepContext) -> StepOutput:
        return StepOutput(self.model.features(ctx.tokens, ctx.cond))


class Counts:
    """The per-generation counters, summed from the steps' outputs: base calls (per sample, so
    a per-sample full step adds the share of samples it served), one counter per other kind, and
    the base FLOPs spent over those of vanilla at the same N. A per-sample share stays a device
    tensor until `result`: the loop never waits on the device inside its steps."""

    def __init__(self) -> None:
        self.values: dict[str, float | torch.Tensor] = {"base_calls": 0.0, "shortcut_calls": 0}
        self.flops: float | torch.Tensor = 0.0
        self.steps = 0

    def add(self, out: StepOutput) -> None:
        full = out.full.float().mean() if torch.is_tensor(out.full) else float(out.full)
        self.values["base_calls"] = self.values["base_calls"] + full
        if out.kind != "base_calls":
            self.values[out.kind] = self.values.get(out.kind, 0) + 1
        self.flops = self.flops + (full if out.base_flops is None else out.base_flops)
        self.steps += 1

    def result(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.values.items()}
        out = {k: int(v) if v.is_integer() else v for k, v in values.items()}
        return {**out, "base_flops_fraction": float(self.flops) / self.steps if self.steps else 0.0}


def revealable(masked: torch.Tensor, eligible: torch.Tensor | None, n_masked: int,
               n_reveal: int) -> torch.Tensor:
    """The positions (B, M) the sampler may fill this step, in increasing order: every masked
    one (M = n_masked, the schedule's count, which every row has), or the masked ones a source
    marked eligible. Rows must agree on M (the sampler works on a (B, M) block) and have at
    least the n_reveal the schedule asks for. The common path sorts instead of `nonzero`, so
    its shape is known without asking the device."""
    B, L = masked.shape
    if eligible is None:                                  # the common path: no extra checks
        return torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :n_masked]
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
             observers: Sequence[Observer] = (),
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> GenerationResult:
    """Generate token grids for conditions `cond` (B,) in `steps` steps.

    Deterministic given `seed`: all randomness comes from one generator, consumed identically by
    every source, so two methods run with one seed differ only through their features.
    `autocast` () -> a context the networks' work of each step runs in (the features, the head,
    the guidance mix), as a reference's torch.autocast wraps its forward; the sampler stays
    outside it, in its own `logits_dtype`.
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

    if source.steps is not None and source.steps != steps:
        raise ValueError(f"{type(source).__name__} was built for N={source.steps} steps, the loop "
                         f"runs {steps}")
    plan = tuple(int(c) for c in counts)
    tally = Counts()
    source.reset()
    for i in range(1, steps + 1):
        ctx = StepContext(step=i, steps=steps, t=(i - 1) / steps, mask_ratio=counts[i - 1] / Lt,
                          tokens=stack(tokens), cond=stacked_cond, prev_features=features,
                          revealed=None if revealed is None else stack(revealed),
                          schedule=plan, branches=sampler.branches, seed=seed)
        with autocast():
            out = source.step(ctx)
            features = out.features                                         # (branches*B, L, D)
            # the M positions this step may fill (every masked one unless the source narrows them)
            masked_pos = revealable(tokens == mask_id, out.eligible, plan[i - 1],
                                    plan[i - 1] - plan[i])                              # (B, M)
            positions = stack(masked_pos)                               # (branches*B, M)
            index = positions.unsqueeze(-1).expand(-1, -1, features.shape[-1])
            scored = model.head(features.gather(1, index), positions=positions)  # (branches*B, M, K)
            weight = sampler.guidance_weight(i, steps)  # w, or the reference's ramp w (i-1)/(N-1)
            logits = guide(scored, weight, sampler.branches)                       # (B, M, K)
        tally.add(out)
        logits = logits / skipped_step_temperature(out, source.skipped_temperature(i))
        drawn, keep = sample_step(logits, counts[i - 1] - counts[i], ctx.t, sampler, generator,
                                  step=i, steps=steps)
        revealed = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, masked_pos, keep)
        tokens = tokens.scatter(1, masked_pos, torch.where(keep, drawn, mask_id))
        decode_step = torch.where(revealed, i, decode_step)
        for obs in observers:
            obs.on_step(ctx, features, tokens, revealed)
    return GenerationResult(tokens, decode_step, tally.result())


def skipped_step_temperature(out: StepOutput, tau: float) -> float | torch.Tensor:
    """1 where the base computed the step in full, `tau` elsewhere: a float, or (B, 1, 1) where
    samples of the step differ."""
    if torch.is_tensor(out.full):
        return torch.where(out.full, 1.0, tau).view(-1, 1, 1)
    return 1.0 if out.full else tau
