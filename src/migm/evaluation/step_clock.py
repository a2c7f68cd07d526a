"""Every step of a generation timed on its own, and what the method keeps between steps.

`migm speed` composes a base's real depth from per-step costs (evaluation/speed.py), so it needs
each step's time and kind (a base call, a shortcut call, a cache's partial step, a forecast), not
just the generation's; and a memory estimate from tensor sizes needs what a method holds between
steps (its caches). `StepClock` wraps the method's feature source for one generation and records
both, without changing what the source computes.
"""

from __future__ import annotations

import time

import torch

from migm.sampling.loop import FeatureSource, StepContext, StepOutput


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
    synchronised inside its steps; on a CPU they are perf_counter readings. After each step it
    also counts the bytes of the tensors the source keeps for later steps (its caches):
    `held_bytes`, the largest count, is what a memory estimate is built from."""

    def __init__(self, source: FeatureSource, device: torch.device | str) -> None:
        self.source, self.cuda = source, torch.device(device).type == "cuda"
        self.steps = source.steps
        self.kinds: list[str] = []
        self._marks: list[tuple[object, object]] = []
        self.held_bytes = 0

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
        self.kinds, self._marks, self.held_bytes = [], [], 0

    def work(self) -> list | None:
        return self.source.work()

    def repeat_work(self, work: list) -> None:
        self.source.repeat_work(work)

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
        self.held_bytes = max(self.held_bytes, held_bytes(self.source))

    def step_ms(self) -> list[float]:
        """Milliseconds of each step of the last generation."""
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in self._marks]
        return [1000 * (end - start) for start, end in self._marks]


def held_bytes(source: object) -> int:
    """Bytes of the distinct tensors a feature source keeps in its attributes (through lists,
    tuples, dicts and plain objects, not into modules: the base's and the shortcut's weights are
    counted as weights). Shape arithmetic only: no copy, no sync."""
    seen: set[int] = set()

    def walk(x, depth: int = 0) -> int:
        if torch.is_tensor(x):
            key = x.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return x.untyped_storage().nbytes()
        if depth > 4 or isinstance(x, (torch.nn.Module, str, bytes, int, float, bool, type(None))):
            return 0
        if isinstance(x, dict):
            return sum(walk(v, depth + 1) for v in x.values())
        if isinstance(x, (list, tuple, set)):
            return sum(walk(v, depth + 1) for v in x)
        return sum(walk(v, depth + 1) for v in getattr(x, "__dict__", {}).values())

    return walk(source)
