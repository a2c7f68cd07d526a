"""TaylorSeer (Liu et al. 2025): forecast cached quantities by a Taylor series between full steps.

The base runs at the first `first_enhance` steps and then every `interval`-th step. At each full
step every cached quantity Q gets finite-difference "derivatives" up to `order`, each from the
previous full step's factors: d_0 = Q, d_{k+1} = (d_k - d_k_prev) / (s - s_prev). In between, Q at
step i is sum_k d_k (i - s)^k / k!, s the last full step. The order available grows by one per
full step, so the first forecasts are plain reuse. Two variants, as the reference offers per
module: `per_layer` False forecasts the last-layer features f (any base, cost ~0); True forecasts
every layer's attention and MLP branch outputs and rebuilds f from the *current* tokens'
embedding (the residual stream carries what the last step decoded; cost: embedding + final map).

Reference facts this relies on (Shenyi-Z/TaylorSeer@288776d, TaylorSeer-DiT/):
- cache_functions/cal_type.py: a step is full iff it is among the first `first_enhance` (the
  DiT loop counts i = N-1 .. 0, full iff i > N - first_enhance - 1) or the counter of Taylor steps
  since the last full one has reached interval - 1; so, 0-indexed j, full iff j < first_enhance or
  (j - first_enhance + 1) % interval == 0: 1-indexed i <= first_enhance or (i - first_enhance) %
  interval == 0. cache_init.py: first_enhance = 2; sample.py: interval 4, max_order 4 by default.
- taylor_utils/__init__.py derivative_approximation: factor 0 is the new value; factor k+1 =
  (factor k - previous factor k) / (distance between the last two full steps), only while the
  previous full step had factor k and the step is not before the last warm-up step
  (`step < N - first_enhance + 1` in DiT's descending count: 1-indexed i >= first_enhance);
  taylor_cache_init clears the factors at the first step. taylor_formula: sum_k factor_k x^k / k!,
  x = step - last full step.
- models.py DiTBlock.forward: the cached modules are each block's attention and MLP outputs
  (before the adaLN gate); at Taylor steps x = x + gate * forecast for both, nothing else runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from migm.accel.method import Method
from migm.models.layers import cached_forward, flop_share, gather_rows
from migm.sampling.loop import FeatureSource, StepContext, StepOutput


@dataclass
class TaylorSeerConfig:
    """One setting. The paper's (N, O) = (interval, order): (4, 2) and (8, 2) at DiMOO's 64 steps."""

    interval: int = 4          # a full step every `interval` steps after the warm-up (1 = vanilla)
    order: int = 2             # O: the highest finite-difference order of the forecast (>= 0)
    first_enhance: int = 2     # full steps at the start (the reference fixes 2)
    per_layer: bool = False    # forecast each layer's attention/MLP outputs instead of f

    def __post_init__(self) -> None:
        for name, low in (("interval", 1), ("order", 0), ("first_enhance", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"TaylorSeer.{name}: must be an integer >= {low}, got {value!r}")
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"TaylorSeer.per_layer: must be true or false, got {self.per_layer!r}")

    def check_steps(self, steps: int) -> None:
        """Knobs that cannot apply at N steps are errors, never silently a vanilla run."""
        if self.interval > steps:
            raise ValueError(f"TaylorSeer.interval: {self.interval} > N={steps}: no forecast "
                             f"would follow a full step's interval")
        if self.first_enhance > steps:
            raise ValueError(f"TaylorSeer.first_enhance: {self.first_enhance} warm-up steps > "
                             f"N={steps}")

    def full_steps(self, steps: int) -> list[int]:
        """The 1-indexed steps at which the base runs (cal_type.py)."""
        return [i for i in range(1, steps + 1)
                if i <= self.first_enhance or (i - self.first_enhance) % self.interval == 0]


class TaylorFactors:
    """The Taylor factors of one cached quantity, kept in fp32 (differences of bf16 features
    divided by small step counts lose the little precision bf16 has)."""

    def __init__(self) -> None:
        self.factors: list[torch.Tensor] = []

    def update(self, value: torch.Tensor, distance: int, max_order: int, differentiate: bool) -> None:
        new = [value.float()]
        if differentiate:
            for k in range(min(max_order, len(self.factors))):
                new.append((new[k] - self.factors[k]) / distance)
        self.factors = new

    def forecast(self, x: int) -> torch.Tensor:
        out = self.factors[0].clone()
        for k in range(1, len(self.factors)):
            out += self.factors[k] * (x**k / math.factorial(k))
        return out


class TaylorSeerSource(FeatureSource):
    """Feature source: base at the full steps, Taylor forecasts between (see the module doc)."""

    def __init__(self, model, config: TaylorSeerConfig, steps: int) -> None:
        super().__init__()
        config.check_steps(steps)
        self.model, self.config, self.steps = model, config, steps
        self.full = frozenset(config.full_steps(steps))
        self.reset()

    def reset(self) -> None:
        self.last_full: int | None = None
        self.cache: dict[object, TaylorFactors] = {}

    def step(self, ctx: StepContext) -> StepOutput:
        if ctx.step in self.full or self.last_full is None:
            return StepOutput(self._full(ctx))
        x = ctx.step - self.last_full
        if not self.config.per_layer:           # features-only forecasts cost no base FLOPs
            return StepOutput(self.cache["f"].forecast(x).to(ctx.prev_features.dtype), full=False,
                              kind="forecasts")
        m = self.model
        s = m.embed_sequence(ctx.tokens, ctx.cond)
        h = s.hidden
        for i in range(len(m.layers())):
            h = h + self.cache[i, "attn"].forecast(x).to(h.dtype)
            h = h + self.cache[i, "mlp"].forecast(x).to(h.dtype)
        shape = m.layer_shape()
        spent = len(h) * (h.shape[1] * shape.embed_row + s.grid.shape[1] * shape.final_row)
        return StepOutput(m.final(gather_rows(h, s.grid)), full=False, kind="forecasts",
                          base_flops=flop_share(shape, s, spent))

    def _full(self, ctx: StepContext) -> torch.Tensor:
        distance = ctx.step - (self.last_full or 0)
        differentiate = self.last_full is not None and ctx.step >= self.config.first_enhance
        self.last_full = ctx.step

        def record(key, value):
            self.cache.setdefault(key, TaylorFactors()).update(value, distance, self.config.order,
                                                               differentiate)

        m = self.model
        if not self.config.per_layer:
            f = m.features(ctx.tokens, ctx.cond)
            record("f", f)
            return f
        s = m.embed_sequence(ctx.tokens, ctx.cond)
        h, kept = cached_forward(m, s, keep=("attn", "mlp"))
        for i, out in enumerate(kept):
            record((i, "attn"), out["attn"])
            record((i, "mlp"), out["mlp"])
        return m.final(gather_rows(h, s.grid))


@dataclass
class TaylorSeer(Method):
    """TaylorSeer on the one loop. Swept: `steps`, `interval`, `order`; fixed: `first_enhance`
    (the reference's 2) and `per_layer` (False: forecast last-layer features; True: every
    layer's attention and MLP outputs, the reference's DiT variant)."""

    interval: list[int] = field(default_factory=lambda: [4, 8])
    order: list[int] = field(default_factory=lambda: [2])
    first_enhance: int = 2
    per_layer: bool = False

    name: ClassVar[str] = "taylorseer"

    def config(self, interval: int, order: int) -> TaylorSeerConfig:
        return TaylorSeerConfig(interval, order, self.first_enhance, self.per_layer)

    def check(self, steps: int, interval: int, order: int, **knobs) -> None:
        super().check(steps)
        self.config(interval, order).check_steps(steps)

    def label(self, steps: int, interval: int, order: int, **knobs) -> str:
        return f"N{steps}/I{interval}/O{order}" + ("/layers" if self.per_layer else "")

    def source(self, model, shortcut, steps: int, interval: int, order: int, **knobs):
        return TaylorSeerSource(model, self.config(interval, order), steps)
