"""The shipped base model generates the requested classes, with quality far from noise."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from migm.data.images import load_fashion_mnist, to_model_range
from migm.evaluation.features import ClassifierFeatures, load_classifier
from migm.evaluation.grid import GridConfig
from migm.evaluation.quality import QualityMetrics
from migm.evaluation.reference import stats_from_images
from migm.evaluation.vanilla import balanced_conditions, score_steps
from migm.sampling.loop import VanillaSource, generate


def test_balanced_conditions_cycle_through_classes():
    assert balanced_conditions(25, 10).tolist() == [i % 10 for i in range(25)]


def test_shipped_base_follows_the_class_and_scores_far_from_noise(shipped_migm):
    net = load_classifier()
    images, _ = load_fashion_mnist("test")
    reference = stats_from_images(ClassifierFeatures(net), to_model_range(images[:5000]).split(500))
    metrics = QualityMetrics(ClassifierFeatures(net), reference, net)
    rows, _ = score_steps(shipped_migm, metrics, [4, 8], num_samples=400, batch_size=200,
                          config=GridConfig(latency_batch=8, latency_repeats=1))
    for r in rows:
        assert r["class_accuracy"] >= 0.85, r          # the classifier's own test accuracy: 0.898
        assert r["fid_classifier"] < 200, r            # uniform noise scores ~1900 here
        assert r["base_calls"] == r["steps"] and r["shortcut_calls"] == 0
        assert r["num_samples"] == 400
    assert rows[1]["speedup"] == 1.0                  # N=8 is the reference (its own ratio)
    # N=4 costs half of N=8: said in calls and FLOPs, which no load on the machine changes
    # (the measured speedup is a benchmark's number, `migm bench`, not a unit test's)
    assert [r["base_calls"] for r in rows] == [4, 8]
    assert [r["base_flops_fraction"] for r in rows] == [1.0, 1.0]
    assert rows[0]["ideal_speedup"] == pytest.approx(2.0)
    flops = [_generation_flops(shipped_migm, steps) for steps in (4, 16)]
    assert 3.9 < flops[1] / flops[0] <= 4.0            # the head scores only the masked positions


def _generation_flops(model, steps: int) -> int:
    """Matmul FLOPs of one vanilla generation of 8 samples (torch's FlopCounterMode)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generate(model, VanillaSource(model), torch.arange(8) % 10, steps, seed=0)
    return counter.get_total_flops()
