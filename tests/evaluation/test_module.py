"""EvaluationModule's own settings: the precision its grid generates in."""

from __future__ import annotations

import pytest
import torch

from migm.evaluation.module import EvaluationConfig, EvaluationModule


def test_precision_16_mixed_is_fp16_autocast_around_the_networks():
    module = EvaluationModule(evaluation=EvaluationConfig(precision="16-mixed"))
    with module.autocast():
        assert torch.is_autocast_cpu_enabled() and torch.get_autocast_dtype("cpu") == torch.float16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    module = EvaluationModule(evaluation=EvaluationConfig(precision="32-true"))
    with module.autocast():
        assert not torch.is_autocast_cpu_enabled()


def test_an_unknown_precision_names_the_field():
    with pytest.raises(ValueError, match="evaluation.precision"):
        EvaluationConfig(precision="fp8")
