from migm.evaluation.callback import small_grid
from migm.evaluation.grid import GridConfig
from migm.sampling.sampler import SamplerConfig


def test_small_grid_samples_the_way_the_test_grid_does():
    like = GridConfig(sampler=SamplerConfig(temperature=1.1, cfg_weight=0.5), plan_power=2.0,
                      shortcut_temperature=1.2, vanilla_steps=[32])
    small = small_grid(like)
    assert small.sampler == like.sampler
    assert (small.plan_power, small.shortcut_temperature) == (2.0, 1.2)
    assert small.vanilla_steps == [8, 16] and small.budgets == [4, 8]     # its own, smaller grid
    assert small_grid().sampler == SamplerConfig() and small_grid().plan_power == 1.0
