"""An evaluation grid: methods x (N, B), all run through the same loop on the same seeds.

`EvaluationGrid` is fed batches of (conditions, seed) and keeps one quality accumulator per
configuration, so it works inside Lightning's test loop (each rank feeds its share; torchmetrics
synchronises FID across ranks) and inside a plain loop alike. Latency is measured afterwards in
one process, vanilla reference included, so every speedup compares numbers taken on the same
machine in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from migm.accel.refresh import RefreshPlan
from migm.accel.reuse import ReuseSource
from migm.accel.shortcut import ShortcutSource
from migm.evaluation.bench import call_costs
from migm.evaluation.latency import measure_latency
from migm.evaluation.quality import QualityMetrics
from migm.sampling.loop import VanillaSource, generate
from migm.sampling.sampler import SamplerConfig

Method = Literal["vanilla", "shortcut", "reuse"]


@dataclass(frozen=True)
class GridPoint:
    method: Method
    steps: int
    budget: int | None = None          # base calls; vanilla uses all N

    @property
    def label(self) -> str:
        return f"N{self.steps}" if self.method == "vanilla" else f"N{self.steps}/B{self.budget}"


@dataclass
class GridConfig:
    """Which configurations `test` (and the training-time callback) evaluate, and how."""

    vanilla_steps: list[int] = field(default_factory=lambda: [4, 6, 8, 12, 16, 32])
    shortcut_steps: list[int] = field(default_factory=lambda: [16, 32])
    budgets: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    reuse: bool = False                # also feature reuse at every shortcut (N, B): the untrained floor
    plan_power: float = 1.0            # base at 1 + floor(N (j/B)^p): 1 = the paper's uniform plan, > 1 front-loads
    shortcut_temperature: float = 1.0  # divides the logits on steps the base skips (shortcut or reuse)
    reference_steps: int = 32          # speedup = latency(vanilla at this N) / latency(method)
    schedule: str = "arccos"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    latency_batch: int = 64
    latency_repeats: int = 3
    keep_images: int = 100             # per configuration, for the side-by-side sample grids
    seed: int = 0                      # batch seeds are seed + index of the batch's first sample

    def points(self) -> list[GridPoint]:
        points = [GridPoint("vanilla", n) for n in self.vanilla_steps]
        methods = ["shortcut", "reuse"] if self.reuse else ["shortcut"]
        points += [GridPoint(m, n, b) for m in methods for n in self.shortcut_steps for b in self.budgets if b < n]
        if self.reference_steps not in self.vanilla_steps:
            raise ValueError(f"reference_steps {self.reference_steps} must be one of vanilla_steps "
                             f"{self.vanilla_steps}: speedups are measured against it in the same run")
        return points


def make_source(model, point: GridPoint, shortcut: nn.Module | None, plan_power: float = 1.0,
                shortcut_temperature: float = 1.0):
    if point.method == "vanilla":
        return VanillaSource(model)
    refresh = RefreshPlan.front_loaded(point.steps, point.budget, plan_power)
    if point.method == "reuse":
        return ReuseSource(model, refresh, shortcut_temperature)   # the floor, sampled alike
    if shortcut is None:
        raise ValueError(f"{point.label}: a shortcut configuration needs a shortcut network")
    return ShortcutSource(model, shortcut, refresh, shortcut_temperature)


class EvaluationGrid(nn.Module):
    def __init__(self, model, shortcut: nn.Module | None, metrics: QualityMetrics, config: GridConfig) -> None:
        super().__init__()
        self.model, self.shortcut, self.config = model, shortcut, config
        self.points = config.points() if shortcut is not None else [
            GridPoint("vanilla", n) for n in config.vanilla_steps]
        self.metrics = nn.ModuleList(metrics.clone() for _ in self.points)   # one per configuration
        self.calls: dict[GridPoint, dict[str, int]] = {}
        self.kept: dict[GridPoint, list[torch.Tensor]] = {p: [] for p in self.points}

    def generate(self, point: GridPoint, cond: torch.Tensor, seed: int):
        source = make_source(self.model, point, self.shortcut, self.config.plan_power,
                             self.config.shortcut_temperature)
        return generate(self.model, source, cond, point.steps, schedule=self.config.schedule,
                        sampler=self.config.sampler, seed=seed)

    @torch.no_grad()
    def update(self, cond: torch.Tensor, seed: int) -> None:
        """Generate this batch with every configuration and score it."""
        for point, metrics in zip(self.points, self.metrics):
            result = self.generate(point, cond, seed)
            images = self.model.decode(result.tokens)
            metrics.add_fake(images, cond)
            self.calls[point] = result.counts
            if sum(map(len, self.kept[point])) < self.config.keep_images:
                self.kept[point].append(images.cpu())

    def samples(self, point: GridPoint) -> torch.Tensor:
        return torch.cat(self.kept[point])[: self.config.keep_images]

    def call_costs(self) -> dict[str, float]:
        """ms per base call and per shortcut call on a mid-generation grid at the latency batch."""
        device = next(self.model.parameters()).device
        return call_costs(self.model, self.shortcut, self.config.latency_batch,
                          self.config.latency_repeats, device)

    @torch.no_grad()
    def compute(self, progress: Callable | None = None) -> list[dict]:
        """One row per configuration: quality over everything fed, latency at `latency_batch`."""
        c = self.config
        device = next(self.model.parameters()).device
        lat_cond = torch.arange(c.latency_batch, device=device) % self.model.num_classes
        costs = self.call_costs()
        rows = []
        points = progress(self.points) if progress else self.points
        for point, metrics in zip(points, self.metrics):
            lat = measure_latency(lambda point=point: self.model.decode(self.generate(point, lat_cond, c.seed).tokens),
                                  batch_size=len(lat_cond), repeats=c.latency_repeats,
                                  device=str(lat_cond.device))
            calls = self.calls.get(point, {})
            rows.append({"method": point.method, "label": point.label, "steps": point.steps,
                         "budget": point.budget or point.steps, **metrics.compute(),
                         "base_calls": calls.get("base_calls"),
                         "shortcut_calls": calls.get("shortcut_calls"),
                         "latency_ms_per_image": lat.ms_per_image, "latency_batch": lat.batch_size,
                         "threads": lat.threads, "device": lat.device, **costs,
                         "schedule": c.schedule, "plan_power": None if point.method == "vanilla" else c.plan_power,
                         "shortcut_temperature": None if point.method == "vanilla" else c.shortcut_temperature,
                         **asdict(c.sampler)})
        ref = next(r for r in rows if r["method"] == "vanilla" and r["steps"] == c.reference_steps)
        for r in rows:
            r["reference_steps"] = c.reference_steps
            r["speedup"] = ref["latency_ms_per_image"] / r["latency_ms_per_image"]
            # the bound from model calls alone: what the speedup would be if only calls cost time
            model_ms = r["base_calls"] * costs["base_call_ms"] + (r["shortcut_calls"] or 0) * costs.get("shortcut_call_ms", 0.0)
            r["ideal_speedup"] = c.reference_steps * costs["base_call_ms"] / model_ms
            r["measured_over_ideal"] = r["speedup"] / r["ideal_speedup"]
        return rows

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()
        self.calls.clear()
        self.kept = {p: [] for p in self.points}
