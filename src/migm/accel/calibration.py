"""Per-step temperatures for the steps an accelerator approximates, fitted against the base.

A skipped step's logits come from extrapolated (shortcut) or stale (reuse) features, which may be
too sharp (a regression target is a conditional mean) or too flat, and one hand-set temperature
for every skipped step treats the first step after a base call like the seventh. Calibration instead runs the method itself on
calibration seeds (never the evaluation's), and at every step it approximates also asks the base
for the exact features of the same grid; the step's temperature is the tau minimising

    KL( softmax(z_base / T) || softmax(z_approx / (T tau)) )      summed over the still-masked
                                                                   positions and rows,

with z the guided logits the sampler would see and T the sampler's own temperature (its logit
scale included). The probe only reads: the tokens it generates are those of the uncalibrated run.
On the embedded default every fitted temperature is 0.96-1.04 (docs/results.md, levers): there
the approximations are not mis-scaled, and a hand-set 1.1 acts as a diversity knob instead.
"""

from __future__ import annotations

import torch

from migm.sampling.loop import FeatureSource, StepContext, StepOutput, generate
from migm.sampling.sampler import SamplerConfig, guide

# tau candidates: geometric from 0.5 to 4 (ratio ~1.044); 1.0 and 2.0 lie on the grid
TEMPERATURES = torch.logspace(-1, 2, 49, base=2.0).double()


def kl_by_temperature(target: torch.Tensor, approx: torch.Tensor,
                      taus: torch.Tensor = TEMPERATURES) -> torch.Tensor:
    """sum over rows of KL(softmax(target) || softmax(approx / tau)) for each tau.

    target, approx: (..., K) logits already scaled as the sampler scales them. Returns (len(taus),).
    """
    p_log = torch.log_softmax(target.double().flatten(0, -2), -1)              # (R, K)
    p = p_log.exp()
    a = approx.double().flatten(0, -2)                                         # (R, K)
    out = torch.empty(len(taus), dtype=torch.float64)
    for k, tau in enumerate(taus.tolist()):
        out[k] = (p * (p_log - torch.log_softmax(a / tau, -1))).sum()
    return out


class CalibrationProbe(FeatureSource):
    """Wraps a source: on each step it does not compute in full, also runs the base at the same
    grid and adds that step's KL-by-temperature curve to `kl[step]`; it samples as the source
    would (its temperature, its eligible positions)."""

    def __init__(self, source: FeatureSource, model, sampler: SamplerConfig,
                 taus: torch.Tensor = TEMPERATURES) -> None:
        super().__init__(source.temperature)
        self.source, self.model, self.sampler, self.taus = source, model, sampler, taus
        self.steps, self.step_temperatures = source.steps, source.step_temperatures
        self.kl: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.source.reset()

    def _scaled_guided(self, features: torch.Tensor, ctx: StepContext, positions: torch.Tensor):
        stacked = positions.repeat(ctx.branches, 1)                            # (branches*B, M)
        index = stacked.unsqueeze(-1).expand(-1, -1, features.shape[-1])
        logits = self.model.head(features.gather(1, index), positions=stacked)  # (branches*B, M, K)
        guided = guide(logits, self.sampler.guidance_weight(ctx.step, ctx.steps), ctx.branches)
        return guided.float() * self.sampler.logit_scale / self.sampler.temperature  # (B, M, K)

    def step(self, ctx: StepContext) -> StepOutput:
        out = self.source.step(ctx)
        features = out.features                                           # (branches*B, L, D)
        if out.full is False:                                             # an approximated step
            exact = self.model.features(ctx.tokens, ctx.cond)
            rows = len(ctx.tokens) // ctx.branches
            masked = ctx.tokens[:rows] == self.model.mask_id                  # (B, L)
            positions = masked.nonzero()[:, 1].view(rows, -1)                 # (B, M)
            curve = kl_by_temperature(self._scaled_guided(exact, ctx, positions),
                                      self._scaled_guided(features, ctx, positions), self.taus)
            self.kl[ctx.step] = self.kl.get(ctx.step, 0) + curve
        return out


def fit_step_temperatures(model, source: FeatureSource, cond: torch.Tensor, steps: int, *,
                          schedule: str, sampler: SamplerConfig, seed: int, batch_size: int = 250,
                          taus: torch.Tensor = TEMPERATURES) -> dict[int, float]:
    """{step: tau} for every step the source approximates, over the conditions `cond` (generated
    in batches of `batch_size`, the batch from sample j with seed `seed + j`, as the evaluation
    seeds its batches). tau replaces the source's own `temperature` on that step; the calibration
    run itself samples with the source's temperature."""
    probe = CalibrationProbe(source, model, sampler, taus)
    for start in range(0, len(cond), batch_size):
        generate(model, probe, cond[start:start + batch_size], steps, schedule=schedule,
                 sampler=sampler, seed=seed + start)
    return {step: float(taus[int(curve.argmin())]) for step, curve in sorted(probe.kl.items())}
