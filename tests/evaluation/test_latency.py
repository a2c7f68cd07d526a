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
