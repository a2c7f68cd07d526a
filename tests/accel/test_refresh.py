import pytest

from migm.accel.refresh import RefreshPlan


@pytest.mark.parametrize("steps,budget", [(32, 9), (64, 14), (16, 4), (10, 10), (7, 1)])
def test_uniform_plan_is_the_papers_formula(steps, budget):
    plan = RefreshPlan.uniform(steps, budget)
    assert sorted(plan.base_steps) == sorted({1 + (j * steps) // budget for j in range(budget)})
    assert plan.budget == budget and 1 in plan.base_steps


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match="budget"):
        RefreshPlan.uniform(8, 9)
    with pytest.raises(ValueError, match="step 1"):
        RefreshPlan.explicit(8, [2, 5])
    with pytest.raises(ValueError, match="outside"):
        RefreshPlan.explicit(8, [1, 9])


@pytest.mark.parametrize("steps,budget", [(32, 8), (32, 4), (16, 10), (8, 6), (8, 8), (5, 1)])
@pytest.mark.parametrize("power", [1.0, 1.5, 2.0, 3.0])
def test_front_loaded_plan_keeps_b_steps_no_later_than_uniform(steps, budget, power):
    plan = RefreshPlan.front_loaded(steps, budget, power)
    front, uniform = sorted(plan.base_steps), sorted(RefreshPlan.uniform(steps, budget).base_steps)
    assert len(front) == budget and front[0] == 1 and front[-1] <= steps
    assert all(f <= u for f, u in zip(front, uniform))          # each base call comes no later
    if power == 1.0:
        assert front == uniform


def test_front_loaded_plan_by_hand():
    # 1 + floor(32 (j/8)^1.5) for j = 0..7: 1 + floor(0, 1.41, 4, 7.35, 11.31, 15.81, 20.78, 26.19)
    assert sorted(RefreshPlan.front_loaded(32, 8, 1.5).base_steps) == [1, 2, 5, 8, 12, 16, 21, 27]
    # N=8, B=6, power 2: 1 + floor(8 (j/6)^2) = 1, 1, 2, 3, 4, 6 -> collisions move one step later
    assert sorted(RefreshPlan.front_loaded(8, 6, 2.0).base_steps) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="power"):
        RefreshPlan.front_loaded(8, 3, 0.5)
