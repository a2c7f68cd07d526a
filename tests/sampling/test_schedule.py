import math

import pytest
import torch

from migm.sampling.schedule import SCHEDULES, masked_counts, reveal_counts


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("num_tokens", [1, 7, 49, 196])
def test_reveals_sum_to_L_with_at_least_one_per_step(schedule, num_tokens):
    for steps in range(1, num_tokens + 1):
        reveals = reveal_counts(num_tokens, steps, schedule)
        assert len(reveals) == steps
        assert sum(reveals) == num_tokens
        assert min(reveals) >= 1


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_counts_follow_the_paper_formula_wherever_it_reveals_tokens_every_step(schedule):
    # ceil(L*gamma(t_{i-1})) - ceil(L*gamma(t_i)); ours differs only where that would be 0.
    gamma, L = SCHEDULES[schedule], 49
    compared = 0
    for N in range(1, L + 1):
        formula = [math.ceil(L * float(gamma(torch.tensor(i / N, dtype=torch.float64))) - 1e-9)
                   for i in range(N + 1)]
        if all(a > b for a, b in zip(formula, formula[1:])):
            assert masked_counts(L, N, schedule) == formula
            compared += 1
    assert compared >= 5


def test_schedules_are_monotone_from_one_to_zero():
    t = torch.linspace(0, 1, 101)
    for name, gamma in SCHEDULES.items():
        g = gamma(t)
        assert g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0, abs=1e-6), name
        assert (g[1:] <= g[:-1] + 1e-7).all(), name


def test_bad_steps_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        reveal_counts(49, 0)
    with pytest.raises(ValueError, match="cannot exceed"):
        reveal_counts(49, 50)
    with pytest.raises(ValueError, match="schedule must be one of"):
        reveal_counts(49, 4, "square")
