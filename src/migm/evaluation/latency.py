"""Latency per image: warm-up, then the median of timed repeats, with the thread count recorded."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Latency:
    ms_per_image: float      # median over repeats of (batch time / batch size)
    ms_per_batch: float
    batch_size: int
    repeats: int
    threads: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_latency(fn: Callable[[], object], batch_size: int, *, warmup: int = 1, repeats: int = 5,
                    device: str = "cpu") -> Latency:
    """Time `fn()` (which generates one batch of `batch_size` images)."""
    batch = compare_latency({"fn": fn}, warmup=warmup, repeats=repeats, device=device)["fn"] / 1000
    return Latency(ms_per_image=1000 * batch / batch_size, ms_per_batch=1000 * batch,
                   batch_size=batch_size, repeats=repeats, threads=torch.get_num_threads(),
                   device=device)


def compare_latency(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                    device: str = "cpu") -> dict[str, float]:
    """Median ms per call of each function, timed in turn within every repeat.

    A ratio of two costs taken minutes apart on a shared machine drifts with its load (the same
    base/shortcut ratio read 13.8x and 16.4x in two runs); alternating the calls exposes both to
    the same conditions, so their ratio is what it claims to be.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}
