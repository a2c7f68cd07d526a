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


# Kaiwen-Zhu/MIGM-Shortcut sample_shortcut: s_k = max(s_{k-1} + 1, round(N k / B)), 0-indexed.
@pytest.mark.parametrize("steps,budget,expected", [
    (15, 7, [1, 3, 5, 7, 10, 12, 14]),          # round(15 k / 7) = 2, 4, 6, 9, 11, 13 (0-indexed)
    (15, 8, [1, 3, 5, 7, 9, 10, 12, 14]),       # 15 * (4/8) = 7.5 rounds half to even: 8
    (32, 8, [1, 5, 9, 13, 17, 21, 25, 29]),
    (32, 9, [1, 5, 8, 12, 15, 19, 22, 26, 29]),
    (32, 12, [1, 4, 6, 9, 12, 14, 17, 20, 22, 25, 28, 30]),
    (64, 14, [1, 6, 10, 15, 19, 24, 28, 33, 38, 42, 47, 51, 56, 60]),
])
def test_official_plan_is_the_released_codes_rounding(steps, budget, expected):
    assert sorted(RefreshPlan.official(steps, budget).base_steps) == expected


def test_official_and_uniform_plans_agree_only_where_n_over_b_is_whole():
    assert RefreshPlan.official(32, 8) == RefreshPlan.uniform(32, 8)
    assert sorted(RefreshPlan.uniform(15, 7).base_steps) == [1, 3, 5, 7, 9, 11, 13]
    assert RefreshPlan.official(15, 7) != RefreshPlan.uniform(15, 7)
    for steps in range(1, 40):                  # always B distinct steps inside 1..N, step 1 first
        for budget in range(1, steps + 1):
            plan = sorted(RefreshPlan.official(steps, budget).base_steps)
            assert len(plan) == budget and plan[0] == 1 and plan[-1] <= steps


def test_plans_by_name():
    assert RefreshPlan.named("official", 15, 7) == RefreshPlan.official(15, 7)
    assert RefreshPlan.named("uniform", 15, 7) == RefreshPlan.uniform(15, 7)
    assert RefreshPlan.named("front_loaded", 32, 8, 1.5) == RefreshPlan.front_loaded(32, 8, 1.5)
    with pytest.raises(ValueError, match="plan must be one of"):
        RefreshPlan.named("adaptive", 15, 7)
    with pytest.raises(ValueError, match="budget"):
        RefreshPlan.official(8, 9)
