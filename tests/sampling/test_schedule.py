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


# --- count schedules: the references' own arithmetic ---
# valeoai/Maskgit-pytorch@674ef1d Trainer/vit.py adap_sche, recomputed by hand in float32:
# round(arccos(linspace(1, 0, N)) / (pi/2) / sum * L), zeros -> 1, remainder on the last step.
MASKGIT_1024_15 = [1, 26, 38, 46, 54, 61, 67, 73, 79, 84, 89, 94, 99, 104, 109]
MASKGIT_1024_32 = [1, 8, 12, 14, 17, 19, 20, 22, 24, 25, 27, 28, 29, 31, 32, 33, 34, 36, 37, 38,
                   39, 40, 41, 42, 43, 44, 45, 47, 48, 49, 50, 49]
MASKGIT_1024_8 = [1, 72, 103, 128, 150, 171, 190, 209]
# Alpha-VLLM/Lumina-DiMOO generate_image: max(1, floor(L cos(pi/2 i/N))) stay masked after step i
DIMOO_4096_64 = [4096, 4094, 4091, 4084, 4076, 4065, 4051, 4035, 4017, 3996, 3973, 3947, 3919,
                 3889, 3856, 3821, 3784, 3744, 3702, 3658, 3612, 3563, 3513, 3460, 3405, 3348,
                 3289, 3229, 3166, 3101, 3034, 2966, 2896, 2824, 2750, 2675, 2598, 2519, 2439,
                 2358, 2275, 2191, 2105, 2018, 1930, 1841, 1751, 1659, 1567, 1474, 1379, 1284,
                 1189, 1092, 995, 897, 799, 700, 601, 501, 401, 301, 200, 100, 0]


@pytest.mark.parametrize("steps,expected", [(15, MASKGIT_1024_15), (32, MASKGIT_1024_32),
                                            (8, MASKGIT_1024_8)])
def test_maskgit_reference_reveals_adap_sche_counts_at_1024_tokens(steps, expected):
    assert reveal_counts(1024, steps, "maskgit_reference") == expected
    assert masked_counts(1024, steps, "maskgit_reference")[:3] == [1024, 1024 - expected[0],
                                                                   1024 - sum(expected[:2])]


def test_maskgit_reference_small_grid_and_its_limits():
    # L = 49 (the embedded default's 7x7 grid): rounding leaves a remainder of 4 for the last step
    assert reveal_counts(49, 15, "maskgit_reference") == [1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5,
                                                          4]
    with pytest.raises(ValueError, match="maskgit_reference.*steps >= 2"):
        masked_counts(1024, 1, "maskgit_reference")
    # at N = 261 the zeros raised to one overrun L: the reference would stop before step N
    with pytest.raises(ValueError, match="maskgit_reference.*stop early"):
        masked_counts(1024, 261, "maskgit_reference")
    assert sum(reveal_counts(1024, 260, "maskgit_reference")) == 1024


def test_dimoo_cosine_keeps_the_references_counts_masked_at_4096_tokens():
    counts = masked_counts(4096, 64, "dimoo_cosine")
    assert counts == DIMOO_4096_64
    assert counts[0] - counts[1] == 2                 # step 1 reveals 2 (arccos/ceil would say 40)
    # the formula written out in float64: no value lies near an integer, so precision cannot matter
    assert counts[1:64] == [max(1, math.floor(4096 * math.cos(math.pi / 2 * i / 64)))
                            for i in range(1, 64)]


def test_dimoo_cosine_reveals_at_least_one_token_where_the_floor_stalls():
    # L = 7, N = 7: floor(7 cos(.)) stays at 6 for a while; the top-k cut still reveals one a step
    assert masked_counts(7, 7, "dimoo_cosine") == [7, 6, 5, 4, 3, 2, 1, 0]
    assert masked_counts(49, 8, "dimoo_cosine") == [49, 48, 45, 40, 34, 27, 18, 9, 0]


@pytest.mark.parametrize("schedule", ["maskgit_reference", "dimoo_cosine"])
@pytest.mark.parametrize("num_tokens", [7, 49, 196])
def test_count_schedules_reveal_L_with_at_least_one_per_step(schedule, num_tokens):
    checked = 0
    for steps in range(2, num_tokens + 1):
        try:
            reveals = reveal_counts(num_tokens, steps, schedule)
        except ValueError as err:
            assert "stop early" in str(err) and schedule == "maskgit_reference"
            continue
        assert len(reveals) == steps and sum(reveals) == num_tokens and min(reveals) >= 1
        checked += 1
    assert checked >= min(num_tokens - 1, 5)
