from migm.accel.method import Vanilla
from migm.accel.shortcut import Shortcut
from migm.evaluation.callback import small_grid
from migm.evaluation.grid import GridConfig
from migm.sampling.sampler import SamplerConfig


def test_small_grid_samples_the_way_the_test_grid_does():
    like = GridConfig(methods=[Vanilla(steps=[32]), Shortcut(steps=[32], budgets=[8], plan="front_loaded",
                                                              plan_power=2.0, temperature=1.2)],
                      sampler=SamplerConfig(temperature=1.1, cfg_weight=0.5), schedule="cosine")
    small = small_grid(like)
    assert (small.sampler, small.schedule) == (like.sampler, "cosine")
    shortcut = next(m for m in small.methods if isinstance(m, Shortcut))
    assert (shortcut.plan, shortcut.plan_power, shortcut.temperature) == ("front_loaded", 2.0, 1.2)
    assert [p.label for p in small.points()] == ["N8", "N16", "N16/B4", "N16/B8"]   # its own, smaller grid
    default = next(m for m in small_grid().methods if isinstance(m, Shortcut))
    assert small_grid().sampler == SamplerConfig() and default.plan == "uniform"
