"""Latency that survives a busy machine: interleaved rounds, per-round ratios, load and memory.

Timing configurations one after another lets load during one measurement skew every speedup (a
`make demo` run beside another job read vanilla N=32 at 649 ms where a quiet machine gives 289).
So every configuration is timed once per *round*, the reference in every round, and a speedup is
the median over rounds of the per-round ratio: a slow round slows both sides of its own ratio
and is outvoted by the others. The load average and the thread count are recorded beside.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
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


def interleaved_rounds(fns: dict[str, Callable[[], object]], *, warmup: int = 1, rounds: int = 5,
                       device: str = "cpu", memory: bool = False,
                       progress: Callable | None = None) -> Rounds:
    """Call every function once per round, in turn, for `rounds` rounds after `warmup` calls each.

    With `memory`, the peak memory of each function's first timed call is recorded too: the
    highest CUDA allocation on a GPU, or the highest resident set size of this process on a CPU
    (sampled every 2 ms), as an absolute value and above what was resident just before.
    `progress` (e.g. tqdm) gets one tick per call: a study's timing takes minutes.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    bar = progress(range(len(fns) * (rounds + warmup))) if progress else None
    if bar is not None:
        ticks = iter(bar)
        fns = {name: (lambda fn=fn: (fn(), next(ticks, None))) for name, fn in fns.items()}
    try:
        return _rounds(fns, warmup, rounds, device, memory)
    finally:
        if hasattr(bar, "close"):
            bar.close()


def _rounds(fns: dict, warmup: int, rounds: int, device: str, memory: bool) -> Rounds:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, tuple[float, float]] = {}
    load_before = _load()
    for r in range(rounds):
        for name, fn in fns.items():
            watch = PeakMemory(device) if memory and r == 0 else None
            if watch:
                watch.start()
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
            if watch:
                peaks[name] = watch.stop()
    return Rounds(times, peaks, threads=torch.get_num_threads(), device=device,
                  load=(load_before, _load()))


def ideal_speedup(reference_steps: int, base_call_ms: float, steps: int, base_flops_fraction: float,
                  shortcut_calls: float = 0, shortcut_call_ms: float = 0.0) -> float | None:
    """The bound from model calls alone: the speedup over vanilla at `reference_steps` if only
    the base and shortcut calls cost time (a cache's partial step counts as its share of a full
    call's FLOPs). None where a point spends nothing on calls."""
    model_ms = base_flops_fraction * steps * base_call_ms + shortcut_calls * shortcut_call_ms
    return reference_steps * base_call_ms / model_ms if model_ms else None


def compare_latency(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                    device: str = "cpu") -> dict[str, float]:
    """Median ms per call of each function, timed in turn within every repeat (see module doc)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rounds = interleaved_rounds(fns, warmup=warmup, rounds=repeats, device=device)
    return {name: rounds.median_ms(name) for name in fns}


@dataclass
class Rounds:
    times: dict[str, list[float]]               # ms per call, one entry per round
    peaks: dict[str, tuple[float, float]]       # name -> (peak MiB, peak MiB above the start)
    threads: int
    device: str
    load: tuple[float | None, float | None]     # 1-minute load average before and after

    def median_ms(self, name: str) -> float:
        return statistics.median(self.times[name])

    def speedup(self, reference: str, name: str) -> tuple[float, float, float]:
        """(median, min, max) over rounds of time(reference) / time(name) within the round."""
        ratios = [ref / t for ref, t in zip(self.times[reference], self.times[name])]
        return statistics.median(ratios), min(ratios), max(ratios)


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:                              # not available on every platform
        return None


class PeakMemory:
    """Peak memory of what runs between start() and stop(), in MiB (see interleaved_rounds)."""

    def __init__(self, device: str, interval_s: float = 0.002) -> None:
        self.device, self.interval = device, interval_s
        self._peak = self._base = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return
        _release_freed_memory()
        self._base = self._peak = _rss_mib()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_mib())

    def stop(self) -> tuple[float, float]:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_mib())
        return round(peak, 1), round(peak - self._base, 1)


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`) before a CPU reading.

    The allocator keeps what earlier calls freed, and a call that reuses those pages does not
    grow the resident set: without this a generation that allocates hundreds of MiB, run after
    another, reads as allocating nothing. After it, what is resident is what is live, and the
    call's own allocations show as growth. A no-op where the C library has no `malloc_trim`."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)        # the C library this process already runs on
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float:
    """Resident set size of this process (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0
