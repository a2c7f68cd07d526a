"""An evaluation grid: every configured method's settings, run through the same loop on the same
seeds and conditions.

`EvaluationGrid` is fed batches of (conditions, seed) and keeps one quality accumulator per grid
point, so it works inside Lightning's test loop (each rank feeds its share; torchmetrics
synchronises FID across ranks) and inside a plain loop alike. Latency is measured afterwards in
one process, in interleaved rounds with the vanilla reference in every round (evaluation/
latency.py), so every speedup compares numbers taken on the same machine under the same load.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from migm.accel.calibration import fit_step_temperatures
from migm.accel.method import GridPoint, Method, Vanilla
from migm.accel.shortcut import Shortcut
from migm.evaluation.bench import call_costs
from migm.evaluation.latency import ideal_speedup, interleaved_rounds
from migm.evaluation.quality import QualityMetrics
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig


def default_methods() -> list[Method]:
    return [Vanilla(steps=[4, 6, 8, 12, 16, 32]), Shortcut(steps=[16, 32], budgets=[4, 6, 8, 10])]


@dataclass
class GridConfig:
    """Which configurations `test` (and the training-time callback) evaluate, and how.

    Args:
        methods: method families (class_path + init_args in YAML); each expands to its points.
        reference_steps: speedup = latency(vanilla at this N) / latency(point); must be one of
            a Vanilla entry's steps, so the reference runs in the same process and rounds.
        schedule: mask schedule of every point (sampling/schedule.py).
        sampler: the sampler of every point (temperatures, guidance).
        latency_batch: images per timed generation call.
        latency_repeats: timed rounds (every point once per round, after one warm-up).
        keep_images: samples kept per point for the side-by-side grid.
        seed: batch seeds are seed + index of the batch's first sample.
        calibration_seed: the same for the samples a method's `calibrate` fits its temperatures
            on; keep it apart from every evaluation seed range (test: 0.., held-out: 100000..).
    """

    methods: list[Method] = field(default_factory=default_methods)
    reference_steps: int = 32
    schedule: str = "arccos"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    latency_batch: int = 64
    latency_repeats: int = 3
    keep_images: int = 100
    seed: int = 0
    calibration_seed: int = 900_000

    def __post_init__(self) -> None:
        vanilla = [n for m in self.methods if isinstance(m, Vanilla) for n in m.steps]
        if self.reference_steps not in vanilla:
            raise ValueError(f"evaluation.reference_steps: {self.reference_steps} must be one of the "
                             f"Vanilla steps {vanilla}: speedups are measured against it in the same run")
        if self.latency_repeats < 1 or self.latency_batch < 1:
            raise ValueError("evaluation.latency_repeats and latency_batch must be >= 1")
        points = self.points()
        seen = {(p.name, p.label) for p in points}
        if len(seen) != len(points):
            raise ValueError("evaluation.methods: two entries produce the same point; give each "
                             "setting once (or differing fixed fields a method of its own)")

    def points(self) -> list[GridPoint]:
        return [p for m in self.methods for p in m.points()]


def condition_text(model, c: int, width: int = 60) -> str:
    """Condition c as a person reads it: its prompt for a text-to-image base, else its class."""
    prompts = getattr(model, "prompts", None)
    if prompts is not None:
        text = str(prompts[c] if isinstance(prompts, (list, tuple)) else prompts.prompts[c])
        return f'"{text[:width]}{"..." if len(text) > width else ""}"'
    return f"class {c}"


def check_steps(points: list[GridPoint], num_tokens: int) -> None:
    """Every step reveals at least one token: N above the base's L cannot run."""
    if too_long := [p for p in points if p.steps > num_tokens]:
        p = too_long[0]
        raise ValueError(f"evaluation.methods: {type(p.method).__name__}.steps {p.steps} is more "
                         f"than the base's {num_tokens} tokens (every step reveals at least one)")


class EvaluationGrid(nn.Module):
    def __init__(self, model, shortcut: nn.Module | None, metrics: QualityMetrics, config: GridConfig,
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """`autocast`: the context each step's network work runs in (sampling/loop.py)."""
        super().__init__()
        self.model, self.shortcut, self.config, self.autocast = model, shortcut, config, autocast
        self.points = config.points()
        check_steps(self.points, model.num_tokens)
        if shortcut is None and (needy := [p.label for p in self.points if p.method.needs_shortcut]):
            raise ValueError(f"grid points {needy} need shortcut weights and none were given")
        self.metrics = nn.ModuleList(metrics.clone() for _ in self.points)   # one per point
        self.calls: dict[GridPoint, dict[str, float]] = {}
        self.kept: dict[GridPoint, list[torch.Tensor]] = {p: [] for p in self.points}
        self.captions: dict[GridPoint, list[str]] = {p: [] for p in self.points}   # one per kept image
        self.fitted: dict[GridPoint, dict[int, float]] = {}     # calibrated step temperatures

    def generate(self, point: GridPoint, cond: torch.Tensor, seed: int):
        return generate(self.model, self.source(point), cond, point.steps, schedule=self.schedule(point),
                        sampler=self.config.sampler, seed=seed, autocast=self.autocast)

    def source(self, point: GridPoint):
        """The point's feature source, with its step temperatures once calibrated (fitted on the
        first use after a reset, on calibration seeds: the same on every rank)."""
        source = point.source(self.model, self.shortcut)
        samples = getattr(point.method, "calibrate", 0)
        if samples:
            if point not in self.fitted:
                device = next(self.model.parameters()).device
                cond = torch.arange(samples, device=device) % self.model.num_classes
                self.fitted[point] = fit_step_temperatures(
                    self.model, point.source(self.model, self.shortcut), cond, point.steps,
                    schedule=self.schedule(point), sampler=self.config.sampler,
                    seed=self.config.calibration_seed, batch_size=self.config.latency_batch)
            source.step_temperatures = self.fitted[point]
        return source

    def schedule(self, point: GridPoint) -> str:
        return point.method.schedule or self.config.schedule

    @torch.no_grad()
    def update(self, cond: torch.Tensor, seed: int, progress: Callable | None = None,
               points: list[GridPoint] | None = None) -> None:
        """Generate this batch with every point (or those given) and score it (`progress`, e.g.
        tqdm, wraps the points: a batch of a large grid takes many minutes)."""
        pairs = [(p, m) for p, m in zip(self.points, self.metrics) if points is None or p in points]
        for point, metrics in (progress(pairs) if progress else pairs):
            result = self.generate(point, cond, seed)
            images = self.model.decode(result.tokens)
            metrics.add_fake(images, cond)
            self.calls[point] = result.counts
            if sum(map(len, self.kept[point])) < self.config.keep_images:
                self.kept[point].append(images.cpu())
                self.captions[point] += [f"{condition_text(self.model, int(c))}, seed {seed} image {j}"
                                         for j, c in enumerate(cond.tolist())]

    def samples(self, point: GridPoint) -> torch.Tensor:
        return torch.cat(self.kept[point])[: self.config.keep_images]

    def sample_captions(self, point: GridPoint) -> list[str]:
        """What each kept sample was drawn for: its condition (class or prompt) and its batch's
        seed and place in the batch (the batch is one draw: image j of seed s)."""
        return self.captions[point][: self.config.keep_images]

    def call_costs(self) -> dict[str, float]:
        """ms per base call and per shortcut call on a mid-generation grid at the latency batch."""
        device = next(self.model.parameters()).device
        return call_costs(self.model, self.shortcut, self.config.latency_batch,
                          self.config.latency_repeats, device)

    def reference(self) -> GridPoint:
        return next(p for p in self.points if p.name == "vanilla" and p.steps == self.config.reference_steps)

    @torch.no_grad()
    def compute(self, progress: Callable | None = None) -> list[dict]:
        """One row per point: quality over everything fed, then latency at `latency_batch`, timed
        in interleaved rounds (every point once per round), speedups as the median per-round ratio."""
        return self.timed([self.quality_row(p) for p in self.points], progress)

    def quality_row(self, point: GridPoint) -> dict:
        """Everything a point's row says except its timing: its settings, its quality over every
        batch fed (a collective over ranks: every rank calls it, point by point in grid order)
        and the counters of its steps."""
        c = self.config
        return {"method": point.name, "label": point.label, "steps": point.steps,
                "weights": getattr(self.model, "weights", "trained"),   # random: speed/memory only
                "budget": dict(point.knobs).get("budgets", point.steps),
                **self.metrics[self.points.index(point)].compute(),
                **self.calls.get(point, {}),   # every counter the method's steps reported (loop.Counts)
                **{k: v for k, v in point.values.items() if k != "steps"},
                **{f"method_{k}": v for k, v in point.method.describe().items()},
                "schedule": self.schedule(point),
                "step_temperatures": ({str(k): v for k, v in self.fitted[point].items()}
                                      if point in self.fitted else None),
                **asdict(c.sampler), "reference_steps": c.reference_steps}

    def restore(self, point: GridPoint, row: dict) -> None:
        """Take back what a finished point's row recorded and the timing needs: its calibrated
        step temperatures (so it is timed as it was scored, without refitting)."""
        if row.get("step_temperatures"):
            self.fitted[point] = {int(k): float(v) for k, v in row["step_temperatures"].items()}

    @torch.no_grad()
    def timed(self, rows: list[dict], progress: Callable | None = None) -> list[dict]:
        """`rows` (one per point, in grid order) completed with latency, speedup and its range,
        the call-count ideal and peak memory, all from one set of interleaved rounds."""
        c = self.config
        device = next(self.model.parameters()).device
        lat_cond = torch.arange(c.latency_batch, device=device) % self.model.num_classes
        costs = self.call_costs()
        fns = {p: (lambda p=p: self.model.decode(self.generate(p, lat_cond, c.seed).tokens)) for p in self.points}
        rounds = interleaved_rounds(fns, rounds=c.latency_repeats, device=str(device), memory=True,
                                    progress=progress)
        ref = self.reference()
        out = []
        for point, row in zip(self.points, rows):
            speedup, lo, hi = rounds.speedup(ref, point)
            peak, peak_delta = rounds.peaks.get(point, (None, None))
            row = {**row, "latency_ms_per_image": rounds.median_ms(point) / c.latency_batch,
                   "latency_batch": c.latency_batch, "latency_rounds": c.latency_repeats,
                   "speedup": speedup, "speedup_min": lo, "speedup_max": hi,
                   "peak_memory_mib": peak, "peak_memory_above_start_mib": peak_delta,
                   "threads": rounds.threads, "device": rounds.device,
                   "load_before": rounds.load[0], "load_after": rounds.load[1], **costs}
            row["ideal_speedup"] = ideal_speedup(c.reference_steps, costs["base_call_ms"], point.steps,
                                                 row.get("base_flops_fraction", 0.0),
                                                 row.get("shortcut_calls") or 0, costs.get("shortcut_call_ms", 0.0))
            row["measured_over_ideal"] = speedup / row["ideal_speedup"] if row["ideal_speedup"] else None
            out.append(row)
        return out

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()
        self.calls.clear()
        self.fitted.clear()                 # the shortcut may have changed (training callback)
        self.kept = {p: [] for p in self.points}
        self.captions = {p: [] for p in self.points}
