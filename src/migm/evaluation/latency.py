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
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    batch = statistics.median(times)
    return Latency(ms_per_image=1000 * batch / batch_size, ms_per_batch=1000 * batch,
                   batch_size=batch_size, repeats=repeats, threads=torch.get_num_threads(),
                   device=device)
