"""Acceleration methods as configuration: one dataclass per method, chosen by `class_path`.

Every way of making a MIGM faster (fewer steps, a learned shortcut, feature reuse, the caches) is
a feature source for the one generation loop; what differs is how it is configured. A `Method`
is a *family* of settings: its list-valued fields are swept (cartesian product) into grid points,
its scalar fields are fixed, so one YAML entry describes a whole curve of a Pareto plot:

    methods:
      - class_path: migm.accel.method.Vanilla
        init_args: {steps: [4, 8, 16, 32]}
      - class_path: migm.accel.shortcut.Shortcut
        init_args: {steps: [32], budgets: [4, 8], plan: front_loaded, plan_power: 2.0}

Every combination is validated when the config is built (`check`), so a knob that cannot apply
(a budget >= N, an interval longer than the run) is an error naming the field, never a row that
silently disappears. Adding a method is one module: subclass `Method`, say which fields are
knobs, how to `check` them, how to `label` a point and how to build its `source`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from migm.accel.refresh import PLANS, PlanName, RefreshPlan
from migm.sampling.loop import FeatureSource, VanillaSource
from migm.sampling.schedule import COUNT_SCHEDULES, SCHEDULES


@dataclass(frozen=True)
class GridPoint:
    """One concrete setting of a method: what a row of the results table is."""

    name: str                                   # the method's name, e.g. "shortcut"
    steps: int                                  # N
    label: str                                  # e.g. "N32/B8"
    knobs: tuple[tuple[str, Any], ...] = ()     # the swept values other than steps, in field order
    method: Method | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def values(self) -> dict[str, Any]:
        return {"steps": self.steps, **dict(self.knobs)}

    def source(self, model, shortcut=None):
        """A fresh feature source for this setting, with the method's skipped-step temperature
        (the loop applies it wherever the source did not make a full base call)."""
        source = self.method.source(model, shortcut, **self.values)
        source.temperature = self.method.temperature
        return source


@dataclass
class Method:
    """Base of every method. `steps`: the N values to run (each a separate point); `tag`: a
    word appended to every label, so two entries of one method that differ in a fixed field
    (say, two temperatures) stay apart in the table; `temperature`: divides the logits on the
    steps the method does not compute with a full base call (1 = off; vanilla has none);
    `schedule`: this method's mask schedule where it differs from the grid's (None: the grid's),
    since the schedule is a first-order knob and each method is tuned on its own."""

    steps: list[int] = field(default_factory=lambda: [32])
    tag: str = ""
    temperature: float = 1.0
    schedule: str | None = None

    name: ClassVar[str] = "method"
    needs_shortcut: ClassVar[bool] = False      # True: `test` must supply trained shortcut weights
    # True: its full steps are one plain call of the base, storing nothing per layer, so they
    # cost what every other such method's full steps cost (evaluation/speed.py pools them)
    plain_base_steps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and not value:
                raise ValueError(f"{type(self).__name__}.{f.name}: give at least one value")
        for values in self.settings():
            self.check(**values)

    # --- the sweep -----------------------------------------------------------------------------
    def axes(self) -> dict[str, list]:
        """The swept fields (list-valued) in declaration order, steps first."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), list)}

    def settings(self) -> list[dict[str, Any]]:
        axes = self.axes()
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]

    def points(self) -> list[GridPoint]:
        out = []
        for values in self.settings():
            steps = values.pop("steps")
            label = self.label(steps=steps, **values) + (f" {self.tag}" if self.tag else "")
            out.append(GridPoint(self.name, steps, label, tuple(values.items()), self))
        return out

    # --- what each method says -----------------------------------------------------------------
    def check(self, steps: int, **knobs) -> None:
        """Raise ValueError naming the field if this setting cannot apply."""
        if steps < 1:
            raise ValueError(f"{type(self).__name__}.steps: N must be >= 1, got {steps}")
        if not self.temperature > 0:                       # NaN fails this too
            raise ValueError(f"{type(self).__name__}.temperature: must be > 0 (1 = off), got {self.temperature}")
        if self.schedule is not None:
            if self.schedule not in SCHEDULES | COUNT_SCHEDULES:
                raise ValueError(f"{type(self).__name__}.schedule: one of "
                                 f"{sorted(SCHEDULES | COUNT_SCHEDULES)} or null, got {self.schedule!r}")

    def label(self, steps: int, **knobs) -> str:
        return f"N{steps}"

    def source(self, model, shortcut, steps: int, **knobs) -> FeatureSource:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The fixed (non-swept) settings, for the results rows."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not isinstance(getattr(self, f.name), list)}


@dataclass
class Vanilla(Method):
    """The base model at every step: few-step vanilla is the first baseline of every table."""

    name: ClassVar[str] = "vanilla"
    plain_base_steps: ClassVar[bool] = True

    def check(self, steps: int, **knobs) -> None:
        super().check(steps)
        if self.temperature != 1.0:
            raise ValueError("Vanilla.temperature: vanilla skips no step; use the sampler's temperature")

    def source(self, model, shortcut, steps: int, **knobs):
        return VanillaSource(model)


@dataclass
class PlannedMethod(Method):
    """Methods that run the base at B of the N steps of a refresh plan, something cheaper between.

    Args:
        steps: the N values.
        budgets: the B values (base calls per generation); each must satisfy 1 <= B < N.
        plan: which steps get the base: `uniform` (the paper: 1 + floor(jN/B)), `front_loaded`
            (1 + floor(N (j/B)^plan_power): more base calls early), `official` (the released
            MIGM-Shortcut code's choice).
        plan_power: the exponent of `front_loaded` (>= 1; 1 is uniform).
        temperature: (Method's) divides the logits on the steps the base skips (1 = off).
        calibrate: 0, or the number of calibration samples (seeds apart from the evaluation's,
            GridConfig.calibration_seed) on which a temperature for each skipped step is fitted
            against the base before the point is evaluated (accel/calibration.py); it replaces
            `temperature` there, which the calibration run samples with.
    """

    budgets: list[int] = field(default_factory=lambda: [8])
    plan: PlanName = "uniform"
    plan_power: float = 1.0
    calibrate: int = 0

    plain_base_steps: ClassVar[bool] = True      # a base step is the base's own forward

    def check(self, steps: int, budgets: int, **knobs) -> None:
        super().check(steps)
        cls = type(self).__name__
        if not 1 <= budgets < steps:
            raise ValueError(f"{cls}.budgets: B must satisfy 1 <= B < N, got B={budgets} for "
                             f"N={steps} (at B = N every step is a base step: that is vanilla)")
        if self.plan_power < 1:
            raise ValueError(f"{cls}.plan_power: must be >= 1 (1 = uniform), got {self.plan_power}")
        if self.plan not in PLANS:
            raise ValueError(f"{cls}.plan: must be one of {', '.join(PLANS)}, got {self.plan!r}")
        if self.calibrate < 0:
            raise ValueError(f"{cls}.calibrate: the number of calibration samples, >= 0 (0 = off), "
                             f"got {self.calibrate}")

    def label(self, steps: int, budgets: int, **knobs) -> str:
        return f"N{steps}/B{budgets}"

    def refresh_plan(self, steps: int, budget: int) -> RefreshPlan:
        return RefreshPlan.named(self.plan, steps, budget, self.plan_power)
