"""The evaluation grid: what it keeps of each point's samples, and what it refuses to run."""

from __future__ import annotations

import pytest
import torch

from migm.accel.method import Vanilla
from migm.evaluation.grid import EvaluationGrid, GridConfig, condition_text
from migm.evaluation.quality import QualityMetrics


def test_each_kept_sample_is_captioned_with_its_condition_and_seed(small_migm):
    config = GridConfig(methods=[Vanilla(steps=[2])], reference_steps=2, keep_images=5)
    grid = EvaluationGrid(small_migm, None, QualityMetrics(), config)
    grid.update(torch.tensor([3, 1, 4]), seed=40)
    grid.update(torch.tensor([1, 5, 9]), seed=43)
    (point,) = grid.points
    assert len(grid.samples(point)) == 5
    assert grid.sample_captions(point) == ["class 3, seed 40 image 0", "class 1, seed 40 image 1",
                                           "class 4, seed 40 image 2", "class 1, seed 43 image 0",
                                           "class 5, seed 43 image 1"]


def test_a_prompt_condition_is_captioned_with_its_text():
    class Prompted:
        prompts = ["a red fox in the snow", "x" * 100]
    assert condition_text(Prompted(), 0) == '"a red fox in the snow"'
    assert condition_text(Prompted(), 1) == '"' + "x" * 60 + '..."'


def test_more_steps_than_tokens_is_refused_naming_the_field(small_migm):
    config = GridConfig(methods=[Vanilla(steps=[4, small_migm.num_tokens + 1])], reference_steps=4)
    with pytest.raises(ValueError, match=rf"Vanilla.steps {small_migm.num_tokens + 1} is more than "
                                         rf"the base's {small_migm.num_tokens} tokens"):
        EvaluationGrid(small_migm, None, QualityMetrics(), config)
