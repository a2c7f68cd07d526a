"""Latency and memory at the sizes users run, composed from shallow copies of the base.

A real base at its reference size can take minutes an image on a CPU (MaskGIT-512) or not fit
at all (DiMOO-8B), yet speed does not depend on the weights, and every step of every method
costs an affine function of the base's depth: each layer does the same work at a step (a full
pass, a cache's partial rows, a forecast), and what is not in a layer (embeddings, head,
guidance, sampler, the shortcut) does not depend on depth. So each grid point is run whole, on
the same seeds and conditions, with the base cut to two depths d1 < d2 (random weights at the
reference width, sequence length and batch); every step is timed on its own (`StepClock`), and
step i at the real depth D is

    t_D[i] = t_d1[i] + (D - d1) / (d2 - d1) * (t_d2[i] - t_d1[i]).

A row is `composed_from: depths d1,d2`. Points named in `whole` also run at depth D in the same
rounds, and their row says how far the composition is from the measurement (`composed_over_
measured`): where both fit, this is the check that the composition can be trusted. Peak memory
composes the same way: what a step allocates above the weights grows affinely with depth (the
caches hold a K/V per layer), and the weights of depth D are counted exactly.

Every point is timed once per round, all points and depths in turn (evaluation/latency.py), and a
speedup is the median over rounds of the per-round ratio to the reference vanilla.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from migm.accel.method import GridPoint
from migm.evaluation.grid import GridConfig, check_steps
from migm.evaluation.latency import ideal_speedup, interleaved_rounds
from migm.evaluation.paper_tables import paper_row
from migm.models.random_weights import fill_random, random_base
from migm.sampling.loop import FeatureSource, StepContext, StepOutput, generate

DEPTH_FIELD = {"maskgit": "depth", "dimoo": "n_layers"}    # the base config's number of layers


def base_depth(kind: str, config) -> int:
    if kind not in DEPTH_FIELD:
        raise ValueError(f"speed: base_kind {kind!r} has no reference size to compose; "
                         f"one of {sorted(DEPTH_FIELD)}")
    return getattr(config, DEPTH_FIELD[kind])


def step_kind(out: StepOutput) -> str:
    """What a step cost: `full` (a base call), else the counter it adds to (`shortcut_calls`,
    `partial_steps`, ...); `mixed` where samples of one step differ (the adaptive refresh)."""
    if torch.is_tensor(out.full):
        return "mixed"
    return "full" if out.full else out.kind


class StepClock(FeatureSource):
    """A feature source that times every step of the source it wraps, from the request for f_i
    to the end of the sampler (the loop calls `on_step` last), and notes each step's kind.

    On a GPU the marks are CUDA events read once after the generation, so the loop is never
    synchronised inside its steps; on a CPU they are perf_counter readings."""

    def __init__(self, source: FeatureSource, device: torch.device | str) -> None:
        self.source, self.cuda = source, torch.device(device).type == "cuda"
        self.steps = source.steps
        self.kinds: list[str] = []
        self._marks: list[tuple[object, object]] = []

    @property
    def temperature(self) -> float:
        return self.source.temperature

    @property
    def step_temperatures(self) -> dict[int, float]:
        return self.source.step_temperatures

    def skipped_temperature(self, step: int) -> float:
        return self.source.skipped_temperature(step)

    def reset(self) -> None:
        self.source.reset()
        self.kinds, self._marks = [], []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step(self, ctx: StepContext) -> StepOutput:
        start = self._mark()
        out = self.source.step(ctx)
        self._marks.append((start, None))
        self.kinds.append(step_kind(out))
        return out

    def on_step(self, ctx, features, new_tokens, revealed) -> None:     # the loop's Observer
        self._marks[-1] = (self._marks[-1][0], self._mark())

    def step_ms(self) -> list[float]:
        """Milliseconds of each step of the last generation."""
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in self._marks]
        return [1000 * (end - start) for start, end in self._marks]


@dataclass
class Run:
    """One timed generation: each step's ms and kind, the decode's ms, the method's counters."""

    step_ms: list[float]
    kinds: list[str]
    decode_ms: float
    counts: dict = field(default_factory=dict)


@dataclass
class SpeedModels:
    """The base at depth D (built only if a point runs whole) and at the two composing depths."""

    kind: str
    depth: int
    depths: tuple[int, int]
    models: dict[int, object]                # depth -> base with random weights
    weights_mib: dict[int, float]            # depth -> MiB of the base's weights at that depth


def build_models(kind: str, config, depths: tuple[int, int], whole: bool, seed: int = 0,
                 **options) -> SpeedModels:
    """The base of `kind` at `config` cut to `depths` (and whole if asked), random weights."""
    d1, d2 = depths
    full = base_depth(kind, config)
    if not 1 <= d1 < d2 <= full:
        raise ValueError(f"speed.depths: two depths 1 <= d1 < d2 <= {full} (the base's), got {list(depths)}")
    wanted = sorted({d1, d2, *([full] if whole else [])})
    models = {d: random_base(kind, replace(config, **{DEPTH_FIELD[kind]: d}), seed, **options)
              for d in wanted}
    mib = {d: weights_mib(m) for d, m in models.items()}
    # weights are affine in depth too (one layer's worth each): depth D's, exactly, unbuilt
    mib[full] = mib[d1] + (full - d1) / (d2 - d1) * (mib[d2] - mib[d1])
    return SpeedModels(kind, full, (d1, d2), models, mib)


def weights_mib(model) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def random_shortcut(network_config, seed: int = 0, device: str | torch.device = "cpu"):
    """The shortcut network `network_config` names, at its size, with random weights."""
    return fill_random(network_config.build(), seed).to(device).eval().requires_grad_(False)


class SpeedStudy:
    """Times every point of `grid` on `models`, composes depth D, and writes one row a point."""

    def __init__(self, models: SpeedModels, shortcut, grid: GridConfig, batch: int,
                 whole: list[str] = (), rounds: int = 3, warmup: int = 1, seed: int = 0,
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 only: list[str] | None = None) -> None:
        """`whole`: points ("vanilla N8") also run at depth D; `only`: time just these points
        (and the reference vanilla)."""
        self.models, self.shortcut, self.grid, self.batch = models, shortcut, grid, batch
        self.reference = next(p for p in grid.points() if p.name == "vanilla" and p.steps == grid.reference_steps)
        every = {f"{p.name} {p.label}" for p in grid.points()}
        if unknown := sorted(set(only or ()) - every):
            raise ValueError(f"speed.points: {unknown[0]!r} is not a point of the grid; one of {sorted(every)}")
        self.points = [p for p in grid.points()
                       if only is None or p == self.reference or f"{p.name} {p.label}" in only]
        any_model = next(iter(models.models.values()))
        check_steps(self.points, any_model.num_tokens)
        labels = {f"{p.name} {p.label}" for p in self.points}
        whole = sorted(labels) if list(whole) == ["all"] else whole
        if unknown := [w for w in whole if w not in labels]:     # (a point left out by `only` too)
            raise ValueError(f"speed.whole: {unknown[0]!r} is not a point of the grid; one of "
                             f"{sorted(labels)}")
        if shortcut is None and (needy := [p.label for p in self.points if p.method.needs_shortcut]):
            raise ValueError(f"grid points {needy} need a shortcut network")
        self.whole, self.rounds, self.warmup, self.seed = list(whole), rounds, warmup, seed
        self.autocast = autocast
        self.device = next(any_model.parameters()).device
        self.cond = torch.arange(batch, device=self.device) % any_model.num_classes

    def runs(self, point: GridPoint) -> list[int]:
        """The depths `point` runs at: the two composing ones, and D if it is run whole."""
        d1, d2 = self.models.depths
        return [d1, d2] + ([self.models.depth] if f"{point.name} {point.label}" in self.whole else [])

    def generate(self, point: GridPoint, depth: int) -> tuple[Run, torch.Tensor]:
        model = self.models.models[depth]
        clock = StepClock(point.source(model, self.shortcut), self.device)
        result = generate(model, clock, self.cond, point.steps, sampler=self.grid.sampler,
                          schedule=point.method.schedule or self.grid.schedule, seed=self.seed,
                          observers=[clock], autocast=self.autocast)
        return Run(clock.step_ms(), clock.kinds, 0.0, result.counts), result.tokens

    @torch.no_grad()
    def measure(self, progress: Callable | None = None) -> dict:
        """Every point at every depth it runs at, and one decode, once per round: the records
        (warm-up calls dropped) and the peak memory of each first timed call."""
        records: dict[tuple, list] = {}
        last_tokens = {}

        def call(point, depth):
            run, tokens = self.generate(point, depth)
            records.setdefault((point, depth), []).append(run)
            last_tokens["tokens"] = tokens

        decoder = self.models.models[self.models.depths[0]]
        fns: dict[object, Callable] = {(p, d): (lambda p=p, d=d: call(p, d))
                                       for p in self.points for d in self.runs(p)}
        fns["decode"] = lambda: decoder.decode(last_tokens["tokens"])
        rounds = interleaved_rounds(fns, warmup=self.warmup, rounds=self.rounds,
                                    device=str(self.device), memory=True, progress=progress)
        records = {k: v[-self.rounds:] for k, v in records.items()}      # the timed calls only
        for r, ms in enumerate(rounds.times["decode"]):
            for runs in records.values():
                runs[r].decode_ms = ms
        return {"records": records, "rounds": rounds}

    def rows(self, measured: dict) -> list[dict]:
        records, rounds = measured["records"], measured["rounds"]
        D, (d1, d2) = self.models.depth, self.models.depths
        scale = (D - d1) / (d2 - d1)

        def composed(point, r):                   # step ms at depth D in round r
            a, b = records[(point, d1)][r].step_ms, records[(point, d2)][r].step_ms
            return [x + scale * (y - x) for x, y in zip(a, b)]

        def total(point, r):
            return sum(composed(point, r)) + records[(point, d1)][r].decode_ms

        ref = [total(self.reference, r) for r in range(self.rounds)]
        ref_base = self.costs(self.reference, records)["base_call_ms"]   # every point's ideal uses it
        out = []
        for point in self.points:
            totals = [total(point, r) for r in range(self.rounds)]
            ratios = [a / b for a, b in zip(ref, totals)]
            row = self.costs(point, records)
            row |= {"method": point.name, "label": point.label, "steps": point.steps,
                    "budget": dict(point.knobs).get("budgets", point.steps),
                    **{k: v for k, v in point.values.items() if k != "steps"},
                    "weights": "random", "base_kind": self.models.kind, "depth": D,
                    "composed_from": f"depths {d1},{d2}", "batch": self.batch,
                    "latency_ms_per_image": statistics.median(totals) / self.batch,
                    "speedup": statistics.median(ratios), "speedup_min": min(ratios),
                    "speedup_max": max(ratios), "reference_steps": self.grid.reference_steps,
                    **records[(point, d1)][0].counts, **self.memory(point, rounds, scale)}
            row["ideal_speedup"] = ideal_speedup(self.reference.steps, ref_base, point.steps,
                                                 row["base_flops_fraction"], row["shortcut_calls"],
                                                 row.get("shortcut_call_ms") or 0.0)
            row["measured_over_ideal"] = (row["speedup"] / row["ideal_speedup"]
                                          if row["ideal_speedup"] else None)
            if (point, D) in records and D not in (d1, d2):
                whole = [sum(run.step_ms) + run.decode_ms for run in records[(point, D)]]
                row["measured_latency_ms_per_image"] = statistics.median(whole) / self.batch
                row["composed_over_measured"] = row["latency_ms_per_image"] / row["measured_latency_ms_per_image"]
                row["within_5pct"] = abs(row["composed_over_measured"] - 1) <= 0.05
            row |= paper_row(self.models.kind, point.name, point.label)
            if "paper_speedup" in row:
                row["ours_over_paper"] = row["speedup"] / row["paper_speedup"]
            row |= {"device": str(self.device), "device_name": device_name(self.device),
                    "threads": rounds.threads, "rounds": self.rounds,
                    "load_before": rounds.load[0], "load_after": rounds.load[1]}
            out.append(row)
        return out

    def costs(self, point: GridPoint, records: dict) -> dict:
        """The point's step costs at depth D by kind (medians over rounds of each step), the
        fixed per-step cost (a full step's cost at depth 0: embeddings, head, guidance, sampler),
        a base call (a full step less that) and a shortcut call (a shortcut step less that)."""
        d1, d2 = self.models.depths
        runs1, runs2 = records[(point, d1)], records[(point, d2)]
        kinds = runs1[0].kinds
        per_step = [statistics.median(r.step_ms[i] for r in runs1) for i in range(len(kinds))]
        per_step2 = [statistics.median(r.step_ms[i] for r in runs2) for i in range(len(kinds))]
        slope = [(b - a) / (d2 - d1) for a, b in zip(per_step, per_step2)]
        at_D = [a + (self.models.depth - d1) * s for a, s in zip(per_step, slope)]
        by_kind: dict[str, list[float]] = {}
        for kind, ms in zip(kinds, at_D):
            by_kind.setdefault(kind, []).append(ms)
        full = [i for i, k in enumerate(kinds) if k == "full"]
        fixed = statistics.mean(per_step[i] - d1 * slope[i] for i in full) if full else None
        out = {"step_ms": {k: statistics.mean(v) for k, v in by_kind.items()},
               "step_counts": {k: len(v) for k, v in by_kind.items()},
               "fixed_step_ms": fixed,
               "base_call_ms": statistics.mean(at_D[i] for i in full) - fixed if full else None,
               "decode_ms": statistics.median(r.decode_ms for r in runs1)}
        if "shortcut_calls" in by_kind and fixed is not None:
            out["shortcut_call_ms"] = out["step_ms"]["shortcut_calls"] - fixed
        return out

    def memory(self, point: GridPoint, rounds, scale: float) -> dict:
        """Weights at depth D plus the peak a generation allocates above them, composed from the
        two depths (measured at D where the point runs whole)."""
        d1, d2 = self.models.depths
        above = [rounds.peaks.get((point, d), (None, None))[1] for d in (d1, d2)]
        if None in above:
            return {}
        weights = self.models.weights_mib[self.models.depth]
        out = {"weights_mib": round(weights, 1),
               "peak_memory_mib": round(weights + above[0] + scale * (above[1] - above[0]), 1)}
        if (point, self.models.depth) in rounds.peaks and self.models.depth not in (d1, d2):
            out["measured_peak_memory_mib"] = round(weights + rounds.peaks[(point, self.models.depth)][1], 1)
        return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()

