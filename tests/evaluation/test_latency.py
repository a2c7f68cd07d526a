"""The timing helpers, on a clock the test drives: each timed call advances it by what the test
says, so every number below is exact on a machine of any load (a timing test on a real clock is
a benchmark, and fails when the machine is busy)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from migm.evaluation import latency
from migm.evaluation.latency import compare_latency, interleaved_rounds, measure_latency


class Clock:
    """Stands in for time.perf_counter in latency.py; `spend(ms)` is a call taking that long."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1000


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=c))
    return c


def test_measure_latency_divides_the_batch_time_by_its_size(clock):
    lat = measure_latency(lambda: clock.spend(20), batch_size=4, repeats=3)
    assert lat.ms_per_batch == pytest.approx(20)
    assert lat.ms_per_image == pytest.approx(5)
    assert lat.threads >= 1 and lat.repeats == 3


def test_compare_latency_alternates_calls_and_keeps_their_order_of_cost(clock):
    order = []
    fns = {"slow": lambda: (order.append("slow"), clock.spend(30)),
           "fast": lambda: (order.append("fast"), clock.spend(1))}
    ms = compare_latency(fns, warmup=1, repeats=4)
    # one warm-up each, then the two calls take turns: drift on the machine hits both alike
    assert order == ["slow", "fast"] + ["slow", "fast"] * 4
    assert ms == {"slow": pytest.approx(30), "fast": pytest.approx(1)}


def test_compare_latency_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        compare_latency({"f": lambda: None}, repeats=0)


def test_a_slow_round_does_not_move_the_median_per_round_speedup(clock):
    """Load that hits one round (here: both calls of round 2 ten times slower, and the fast call
    alone in round 4) must not skew the speedup: it is the median of per-round ratios."""
    calls = {"ref": 0, "fast": 0}

    def timed(name, ms):
        def fn():
            calls[name] += 1
            timed_round = calls[name] - 1                 # 0 is the warm-up
            slow = 10 if timed_round == 2 or (name == "fast" and timed_round == 4) else 1
            clock.spend(ms * slow)
        return fn

    rounds = interleaved_rounds({"ref": timed("ref", 20), "fast": timed("fast", 5)}, rounds=5)
    median, lo, hi = rounds.speedup("ref", "fast")
    assert median == pytest.approx(4.0)                 # 20 ms / 5 ms, the slow rounds outvoted
    assert lo == pytest.approx(0.4) and hi == pytest.approx(4.0)   # round 4's lone slow call
    assert rounds.times["ref"] == pytest.approx([20, 200, 20, 20, 20])
    assert calls == {"ref": 6, "fast": 6} and rounds.threads >= 1


def test_peak_memory_sees_a_large_allocation():
    import torch

    rounds = interleaved_rounds({"alloc": lambda: torch.ones(64, 2**20).sum(), "none": lambda: None},
                                rounds=1, warmup=0, memory=True)
    assert rounds.peaks["alloc"][1] > 100            # 256 MiB of float32 above the start
    assert rounds.peaks["none"][1] < 100


REUSE = """
import torch
from migm.evaluation.latency import interleaved_rounds

def alloc():
    xs = [torch.ones(2**18) for _ in range(256)]        # 256 MiB of float32 in 1 MiB tensors
    return sum(x[0] for x in xs)

print(interleaved_rounds({"alloc": alloc}, rounds=1, warmup=1, memory=True).peaks["alloc"][1])
"""


def test_peak_memory_sees_allocations_that_reuse_an_earlier_calls_freed_heap():
    """A long generation run after others reuses heap pages they freed, and the allocator keeps
    such pages (here made certain: glibc told to serve 1 MiB from the heap and never trim it), so
    the resident set does not grow: the reading must hand them back first to see the 256 MiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}
    out = subprocess.run([sys.executable, "-c", REUSE], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) > 200


def test_progress_ticks_once_per_call_and_closes():
    from migm.evaluation.latency import interleaved_rounds

    class Bar:
        def __init__(self, it):
            self.items, self.seen, self.closed = list(it), 0, False

        def __iter__(self):
            for item in self.items:
                self.seen += 1
                yield item

        def close(self):
            self.closed = True

    bars = []
    interleaved_rounds({"a": lambda: None, "b": lambda: None}, warmup=1, rounds=3,
                       progress=lambda it: bars.append(Bar(it)) or bars[-1])
    (bar,) = bars
    assert len(bar.items) == 8 and bar.seen == 8 and bar.closed


def test_the_call_count_ideal_is_the_plans_arithmetic():
    from migm.evaluation.latency import ideal_speedup
    # 32/B9 on MaskGIT: 9 base calls of 3400 ms + 23 shortcut calls of 40 ms against 15 base calls
    assert ideal_speedup(15, 3400.0, 32, 9 / 32, 23, 40.0) == 15 * 3400 / (9 * 3400 + 23 * 40)
    assert ideal_speedup(15, 3400.0, 8, 0.0) is None
