import time

import pytest

from migm.evaluation.latency import compare_latency, measure_latency


def test_measure_latency_divides_the_batch_time_by_its_size():
    lat = measure_latency(lambda: time.sleep(0.02), batch_size=4, repeats=3)
    assert lat.ms_per_batch >= 20
    assert lat.ms_per_image == pytest.approx(lat.ms_per_batch / 4)
    assert lat.threads >= 1 and lat.repeats == 3


def test_compare_latency_alternates_calls_and_keeps_their_order_of_cost():
    order = []
    fns = {"slow": lambda: (order.append("slow"), time.sleep(0.03)),
           "fast": lambda: (order.append("fast"), time.sleep(0.001))}
    ms = compare_latency(fns, warmup=1, repeats=4)
    # one warm-up each, then the two calls take turns: drift on the machine hits both alike
    assert order == ["slow", "fast"] + ["slow", "fast"] * 4
    assert ms["slow"] >= 30 and ms["fast"] < ms["slow"]


def test_compare_latency_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        compare_latency({"f": lambda: None}, repeats=0)


def test_a_slow_round_does_not_move_the_median_per_round_speedup():
    """Load that hits one round (here: both calls of round 2 ten times slower, and the fast call
    alone in round 4) must not skew the speedup: it is the median of per-round ratios."""
    from migm.evaluation.latency import interleaved_rounds
    calls = {"ref": 0, "fast": 0}

    def timed(name, ms):
        def fn():
            calls[name] += 1
            timed_round = calls[name] - 1                 # 0 is the warm-up
            slow = 10 if timed_round == 2 or (name == "fast" and timed_round == 4) else 1
            time.sleep(ms * slow / 1000)
        return fn

    rounds = interleaved_rounds({"ref": timed("ref", 20), "fast": timed("fast", 5)}, rounds=5)
    median, lo, hi = rounds.speedup("ref", "fast")
    assert median == pytest.approx(4.0, rel=0.25)       # 20 ms / 5 ms, the slow rounds outvoted
    assert lo < 1.0 and len(rounds.times["ref"]) == 5   # round 4's lone slow call shows in the range
    assert rounds.threads >= 1


def test_peak_memory_sees_a_large_allocation():
    import torch

    from migm.evaluation.latency import interleaved_rounds
    rounds = interleaved_rounds({"alloc": lambda: torch.ones(64, 2**20).sum(), "none": lambda: None},
                                rounds=1, warmup=0, memory=True)
    assert rounds.peaks["alloc"][1] > 100            # 256 MiB of float32 above the start
    assert rounds.peaks["none"][1] < 100
