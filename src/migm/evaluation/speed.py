"""Latency and memory at the sizes users run, composed from shallow copies of the base.

A real base at its reference size can take minutes an image on a CPU (MaskGIT-512) or not fit
at all (DiMOO-8B), yet speed does not depend on the weights, and every step of every method
costs an affine function of the base's depth: each layer does the same work at a step (a full
pass, a cache's partial rows, a forecast), and what is not in a layer (embeddings, head,
guidance, sampler, the shortcut) does not depend on depth. So each grid point is run whole, on
the same seeds and conditions, with the base cut to two depths d1 < d2 (random weights at the
reference width, sequence length and batch); every step is timed on its own (`StepClock`), and
step i at the real depth D is

    t_D[i] = t_d1[i] + (D - d1) / (d2 - d1) * (t_d2[i] - t_d1[i]),

except a step that runs no base layer (a shortcut step), whose cost is the mean of its two
measurements: its true slope is zero, and extrapolating a difference of two noisy readings
would multiply their noise by (D - d1) / (d2 - d1). And a plain full step (vanilla's, the
shortcut's base steps) is the same layers on the same sequence in every method, so in each round
all of them share one difference t_d2 - t_d1, their mean: a point with few base steps does not
inherit the noise of its own few readings, multiplied as above (`SpeedStudy.pooled`). The
composition also needs a step to do the same work at both depths: where a method's work depends
on the values it computes (ML-Cache recomputes the rows that tie at its threshold, and a base
with no layer ties at every masked row), the shallower depth repeats the deeper one's work
(`FeatureSource.work`).

A row is `composed_from: depths d1,d2`; depths 0 and 1 (the base with no layer, then with one
real layer, at the real sequence) are `composed_from: one_layer`, what a base too big to run
whole on the machine at hand (DiMOO-8B on a CPU) allows. Points named in `whole` also run whole
at a check depth (D unless `check_depth` is smaller) in the same rounds, and their row says how
far the composition to that depth is from the measurement (`composed_over_measured`): this is
the check that the composition can be trusted.

Peak memory is composed the same way (the weights of depth D counted exactly) and estimated from
tensor sizes: the weights, what the method holds between steps (counted by `StepClock`, affine in
depth: a cache holds its tensors per layer) and the most one step allocates for itself. A step's
own allocation is a maximum, not a sum over layers (a layer's activations are freed before the
next one's), so where the composing depths differ in which part sets it (no layer: the head;
one layer: the MLP) the composed peak overstates, and the estimate is the number to use; both
stand beside a whole run's measurement at the check depth.

Every point is timed once per round, all points and depths in turn (evaluation/latency.py), and a
speedup is the median over rounds of the per-round ratio to the reference vanilla.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from migm.accel.method import GridPoint
from migm.evaluation.grid import GridConfig, check_steps
from migm.evaluation.latency import ideal_speedup, interleaved_rounds
from migm.evaluation.paper_tables import paper_row
from migm.evaluation.step_clock import StepClock
from migm.models.random_weights import fill_random, random_base
from migm.sampling.compiled import compile_twins, using_twins
from migm.sampling.loop import generate

DEPTH_FIELD = {"maskgit": "depth", "dimoo": "n_layers"}    # the base config's number of layers


def base_depth(kind: str, config) -> int:
    if kind not in DEPTH_FIELD:
        raise ValueError(f"speed: base_kind {kind!r} has no reference size to compose; "
                         f"one of {sorted(DEPTH_FIELD)}")
    return getattr(config, DEPTH_FIELD[kind])


@dataclass
class Run:
    """One timed generation: each step's ms and kind, the decode's ms, the method's counters, and
    the most bytes its source held between steps."""

    step_ms: list[float]
    kinds: list[str]
    decode_ms: float
    counts: dict = field(default_factory=dict)
    held_bytes: int = 0
    work: list | None = None       # what its data-dependent steps did (FeatureSource.work)


@dataclass
class SpeedModels:
    """The base at the two composing depths, and at the check depth if a point runs whole."""

    kind: str
    depth: int                               # D, the base's
    depths: tuple[int, int]
    models: dict[int, object]                # depth -> base with random weights
    weights_mib: dict[int, float]            # depth -> MiB of the base's weights at that depth
    check_depth: int | None = None           # where `whole` points also run (None: D)

    @property
    def composed_from(self) -> str:
        return "one_layer" if self.depths == (0, 1) else f"depths {self.depths[0]},{self.depths[1]}"

    def scale(self, depth: int) -> float:
        """(depth - d1) / (d2 - d1): how far along the line through the two depths `depth` is."""
        d1, d2 = self.depths
        return (depth - d1) / (d2 - d1)


def build_models(kind: str, config, depths: tuple[int, int], whole: bool, seed: int = 0,
                 check_depth: int | None = None, **options) -> SpeedModels:
    """The base of `kind` at `config` cut to `depths` (and at `check_depth`, default its own, if
    a point runs whole), random weights."""
    d1, d2 = depths
    full = base_depth(kind, config)
    if not 0 <= d1 < d2 <= full:
        raise ValueError(f"speed.depths: two depths 0 <= d1 < d2 <= {full} (the base's), got {list(depths)}")
    check = full if check_depth is None else check_depth
    if not d2 < check <= full:
        raise ValueError(f"speed.check_depth: a depth above the composing ones and at most the "
                         f"base's ({d2} < depth <= {full}), got {check}")
    wanted = sorted({d1, d2, *([check] if whole else [])})
    models = {d: random_base(kind, replace(config, **{DEPTH_FIELD[kind]: d}), seed, **options)
              for d in wanted}
    mib = {d: weights_mib(m) for d, m in models.items()}
    # weights are affine in depth too (one layer's worth each): depth D's, exactly, unbuilt
    mib[full] = mib[d1] + (full - d1) / (d2 - d1) * (mib[d2] - mib[d1])
    return SpeedModels(kind, full, (d1, d2), models, mib, check if whole else None)


def weights_mib(model) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def random_shortcut(network_config, seed: int = 0, device: str | torch.device = "cpu"):
    """The shortcut network `network_config` names, at its size, with random weights."""
    return fill_random(network_config.build(), seed).to(device).eval().requires_grad_(False)


# Step kinds whose cost cannot depend on the base's depth: a shortcut step runs the shortcut and
# the head, never a base layer (accel/shortcut.py, accel/sequence.py)
DEPTH_FREE = {"shortcut_calls"}


def compose(a: list[float], b: list[float], kinds: list[str], s: float,
            pooled: dict[str, float] | None = None) -> list[float]:
    """Each step's ms at the depth a fraction `s` along the line from depth d1 (`a`) to d2 (`b`).
    A depth-free step costs the same at both, so it is the mean of its two measurements:
    extrapolating their difference would only multiply the noise by s (31x for one_layer). A
    step whose kind is in `pooled` takes that d2 - d1 difference instead of its own."""
    pooled = pooled or {}
    return [(x + y) / 2 if k in DEPTH_FREE else x + s * pooled.get(k, y - x)
            for x, y, k in zip(a, b, kinds)]


class SpeedStudy:
    """Times every point of `grid` on `models`, composes depth D, and writes one row a point."""

    def __init__(self, models: SpeedModels, shortcut, grid: GridConfig, batch: int,
                 whole: list[str] = (), rounds: int = 3, warmup: int = 1, seed: int = 0,
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 only: list[str] | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        """`whole`: points ("vanilla N8") also run whole at the check depth; `only`: time just
        these points (and the reference vanilla); `compile`: every run also with the base's
        blocks and the shortcut compiled (sampling/compiled.py), in the same rounds."""
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
        if compile and warmup < 1:
            raise ValueError("speed.warmup: --compile true needs at least one warm-up call (a compiled "
                             "network's first call compiles it), got 0")
        self.twins = ({d: compile_twins(m, shortcut, backend=compile_backend)
                       for d, m in models.models.items()}
                      if compile else {})
        self._work: dict[tuple, list] = {}       # (point, compiled) -> the deeper depth's last work
        self.device = next(any_model.parameters()).device
        self.cond = torch.arange(batch, device=self.device) % any_model.num_classes
        self.num_tokens = any_model.num_tokens        # the paper's rows stand beside its size only
        self.transient_mib = self._transient_mib(any_model)

    def _transient_mib(self, model) -> float:
        """What one step allocates for itself at most, from tensor sizes: the larger of a layer's
        MLP over every row (its input and output, gate, up and their product) and the head's
        fp32 logits with three sampler temporaries of their size (probabilities, noise,
        confidences). Rows: the batch, twice under guidance."""
        rows = self.batch * (2 if self.grid.sampler.cfg_weight else 1)
        tokens = torch.full((1, model.num_tokens), model.mask_id, device=self.device)
        with torch.no_grad():
            T = model.embed_sequence(tokens, self.cond[:1]).hidden.shape[1]      # sequence rows
        with self.autocast():
            kind = self.device.type
            dtype = (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind)
                     else next(model.parameters()).dtype)
        shape = model.layer_shape()
        layer = rows * T * (2 * shape.width + 3 * shape.mlp_hidden) * dtype.itemsize
        head = rows * model.num_tokens * shape.vocab * 4 * 4
        return max(layer, head) / 2**20

    def runs(self, point: GridPoint) -> list[int]:
        """The depths `point` runs at, in the order they run: the deeper composing one first (the
        shallower repeats its work), then the shallower, and the check depth if it is run whole."""
        d1, d2 = self.models.depths
        whole = f"{point.name} {point.label}" in self.whole
        return [d2, d1] + ([self.models.check_depth] if whole else [])

    def generate(self, point: GridPoint, depth: int, compiled: bool = False) -> tuple[Run, torch.Tensor]:
        """One timed generation of `point` at `depth`. Where the method's work depends on the
        values (ML-Cache: how many rows tie at its threshold; with no layer every masked row
        ties), the shallower composing depth repeats what the deeper one's last run did, so the
        two differ by their layers alone; the whole run at the check depth does its own."""
        model = self.models.models[depth]
        twins = self.twins[depth] if compiled else None
        d1, d2 = self.models.depths
        with using_twins(model, twins) if twins else nullcontext():
            clock = StepClock(point.source(model, twins.shortcut if twins else self.shortcut), self.device)
            if depth == d1 and (point, compiled) in self._work:
                clock.repeat_work(self._work[(point, compiled)])
            result = generate(model, clock, self.cond, point.steps, sampler=self.grid.sampler,
                              schedule=point.method.schedule or self.grid.schedule, seed=self.seed,
                              observers=[clock], autocast=self.autocast)
        work = clock.work()
        if depth == d2 and work is not None:
            self._work[(point, compiled)] = work
        return Run(clock.step_ms(), clock.kinds, 0.0, result.counts, clock.held_bytes, work), result.tokens

    @torch.no_grad()
    def measure(self, progress: Callable | None = None) -> dict:
        """Every point at every depth it runs at, and one decode, once per round: the records
        (warm-up calls dropped) and the peak memory of each first timed call."""
        records: dict[tuple, list] = {}
        last_tokens = {}

        def call(key):                    # (point, depth) or (point, depth, "compiled")
            run, tokens = self.generate(*key[:2], compiled=len(key) == 3)
            records.setdefault(key, []).append(run)
            last_tokens["tokens"] = tokens

        decoder = self.models.models[self.models.depths[0]]
        keys = [(p, d) for p in self.points for d in self.runs(p)]
        keys += [(*key, "compiled") for key in keys] if self.twins else []
        fns: dict[object, Callable] = {key: (lambda key=key: call(key)) for key in keys}
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
        D, (d1, d2), C = self.models.depth, self.models.depths, self.models.check_depth
        scale = self.models.scale(D)

        def total(point, r, depth=D, *variant):   # ms at `depth` in round r, composed
            a, b = (records[(point, d, *variant)][r] for d in (d1, d2))
            pooled = self.pooled(records, r, *variant) if point.method.plain_base_steps else None
            steps = compose(a.step_ms, b.step_ms, b.kinds, self.models.scale(depth), pooled)
            return sum(steps) + records[(point, d1)][r].decode_ms

        ref = [total(self.reference, r) for r in range(self.rounds)]
        decode = [records[(self.reference, d1)][r].decode_ms for r in range(self.rounds)]  # one a round
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
                    "composed_from": self.models.composed_from, "batch": self.batch,
                    "latency_ms_per_image": statistics.median(totals) / self.batch,
                    "speedup": statistics.median(ratios), "speedup_min": min(ratios),
                    "speedup_max": max(ratios), "reference_steps": self.grid.reference_steps,
                    **records[(point, d2)][0].counts, **self.memory(point, records, rounds, scale)}
            if (work := records[(point, d2)][0].work) is not None:     # ML-Cache: R per partial step
                row["rows_per_partial_step"] = statistics.mean(work) if work else 0.0
            row["ideal_speedup"] = ideal_speedup(self.reference.steps, ref_base, point.steps,
                                                 row["base_flops_fraction"], row["shortcut_calls"],
                                                 row.get("shortcut_call_ms") or 0.0)
            row["measured_over_ideal"] = (row["speedup"] / row["ideal_speedup"]
                                          if row["ideal_speedup"] else None)
            # the same, less the decode: the ideal counts the generation's calls only, and the
            # decode is one fixed cost every point pays after it (on a CPU a 512x512 VQGAN decode
            # outweighs a MaskGIT-512 base call), pulling measured/ideal down by its share
            row["generation_speedup"] = statistics.median(
                (a - d) / (t - d) for a, t, d in zip(ref, totals, decode))
            row["generation_over_ideal"] = (row["generation_speedup"] / row["ideal_speedup"]
                                            if row["ideal_speedup"] else None)
            if (point, C) in records:
                whole = [sum(run.step_ms) + run.decode_ms for run in records[(point, C)]]
                row["measured_depth"] = C
                row["measured_latency_ms_per_image"] = statistics.median(whole) / self.batch
                composed = [total(point, r, C) for r in range(self.rounds)]
                row["composed_over_measured"] = (statistics.median(composed) / self.batch
                                                 / row["measured_latency_ms_per_image"])
                # each round's own ratio: its whole run sits minutes from its composing runs, so a
                # machine that drifts between rounds shows here rather than in the median
                row["composed_over_measured_rounds"] = [c / w for c, w in zip(composed, whole)]
                row["within_5pct"] = abs(row["composed_over_measured"] - 1) <= 0.05
            if self.twins:
                compiled = [total(point, r, D, "compiled") for r in range(self.rounds)]
                ref_c = [total(self.reference, r, D, "compiled") for r in range(self.rounds)]
                row |= {"compiled_latency_ms_per_image": statistics.median(compiled) / self.batch,
                        "compiled_speedup": statistics.median(a / b for a, b in zip(ref_c, compiled)),
                        "compile_gain": statistics.median(a / b for a, b in zip(totals, compiled))}
            row |= paper_row(self.models.kind, point.name, point.label, self.num_tokens)
            if "paper_speedup" in row:
                row["ours_over_paper"] = row["speedup"] / row["paper_speedup"]
            row |= {"device": str(self.device), "device_name": device_name(self.device),
                    "threads": rounds.threads, "rounds": self.rounds,
                    "load_before": rounds.load[0], "load_after": rounds.load[1]}
            out.append(row)
        return out

    def pooled(self, records: dict, r: int, *variant) -> dict[str, float]:
        """{"full": the mean d2 - d1 difference of every plain full step of round r} (vanilla's
        steps, the shortcut's base steps: `Method.plain_base_steps`), or {} if none ran.

        Such a step is the same layers on the same sequence whichever method takes it, so its
        per-layer cost is one number, and every plain point composes its full steps with it
        rather than with its own few readings: a point with 9 base steps would otherwise carry
        the noise of 9 readings (and whatever the machine did while they ran) times 31 at
        one_layer, and its speedup would compare that against the reference's 64. A cache's full
        step also stores its cache per layer, so it keeps its own."""
        d1, d2 = self.models.depths
        diffs = []
        for p in self.points:
            if p.method.plain_base_steps:
                a, b = (records[(p, d, *variant)][r] for d in (d1, d2))
                diffs += [y - x for x, y, k in zip(a.step_ms, b.step_ms, b.kinds) if k == "full"]
        return {"full": statistics.mean(diffs)} if diffs else {}

    def costs(self, point: GridPoint, records: dict) -> dict:
        """The point's step costs at depth D by kind (medians over rounds of each step), the
        fixed per-step cost (a full step's cost at depth 0: embeddings, head, guidance, sampler),
        a base call (a full step less that) and a shortcut call (a shortcut step less that);
        `full_layer_ms`, what one layer of its own full steps cost, beside the pooled one that
        composed them (`pooled_full_layer_ms`, plain points only)."""
        d1, d2 = self.models.depths
        runs1, runs2 = records[(point, d1)], records[(point, d2)]
        kinds = runs2[0].kinds      # the deeper run's: with no layer a cache is empty, and a
                                    # method may take every step for its first, full one
        per_step = [statistics.median(r.step_ms[i] for r in runs1) for i in range(len(kinds))]
        per_step2 = [statistics.median(r.step_ms[i] for r in runs2) for i in range(len(kinds))]
        pooled = ({"full": statistics.median(self.pooled(records, r)["full"] for r in range(len(runs1)))}
                  if point.method.plain_base_steps else {})     # the reference vanilla is always plain
        own = [(b - a) / (d2 - d1) for a, b in zip(per_step, per_step2)]
        slope = [pooled[k] / (d2 - d1) if k in pooled else x for x, k in zip(own, kinds)]
        at_D = compose(per_step, per_step2, kinds, self.models.scale(self.models.depth), pooled)
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
        if full:
            out["full_layer_ms"] = statistics.mean(own[i] for i in full)
        if pooled:
            out["pooled_full_layer_ms"] = pooled["full"] / (d2 - d1)
        return out

    def memory(self, point: GridPoint, records: dict, rounds, scale: float) -> dict:
        """Weights at depth D plus the peak a generation allocates above them, composed from the
        two depths (and, where the point runs whole, measured and composed at the check depth);
        beside it the estimate from tensor sizes: weights + what the method holds between steps
        (counted, affine in depth) + what one step allocates for itself (`_transient_mib`)."""
        d1, d2 = self.models.depths
        above = [rounds.peaks.get((point, d), (None, None))[1] for d in (d1, d2)]
        if None in above:
            return {}
        weights = self.models.weights_mib[self.models.depth]
        held = [records[(point, d)][0].held_bytes / 2**20 for d in (d1, d2)]

        def estimate(depth: int) -> float:          # weights + caches (affine in depth) + a step's own
            held_at = held[0] + self.models.scale(depth) * (held[1] - held[0])
            return self.models.weights_mib[depth] + held_at + self.transient_mib

        out = {"weights_mib": round(weights, 1),
               "peak_memory_mib": round(weights + above[0] + scale * (above[1] - above[0]), 1),
               "held_mib": round(held[0] + scale * (held[1] - held[0]), 1),
               "estimated_peak_memory_mib": round(estimate(self.models.depth), 1)}
        out["estimated_over_composed"] = round(out["estimated_peak_memory_mib"] / out["peak_memory_mib"], 3)
        C = self.models.check_depth
        if C is not None and (point, C) in rounds.peaks:
            at_c = self.models.weights_mib[C]
            out["measured_peak_memory_mib"] = round(at_c + rounds.peaks[(point, C)][1], 1)
            out["composed_peak_at_measured_depth_mib"] = round(
                at_c + above[0] + self.models.scale(C) * (above[1] - above[0]), 1)
            out["estimated_over_measured"] = round(estimate(C) / out["measured_peak_memory_mib"], 3)
        return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()

