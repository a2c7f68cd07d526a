import torch

from migm.accel.refresh import RefreshPlan
from migm.accel.reuse import ReuseSource
from migm.accel.shortcut import ShortcutSource
from migm.sampling.loop import generate
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork


def test_reuse_is_an_untrained_shortcut_without_its_calls(small_migm):
    """A zero-initialised shortcut returns its input; reuse must make the same samples and count
    the skipped steps as reused, not as shortcut calls."""
    cond, plan = torch.arange(6) % 10, RefreshPlan.uniform(12, 4)
    zero = ShortcutNetwork(ShortcutConfig(feature_dim=small_migm.feature_dim, vocab_size=small_migm.vocab_size,
                                          num_tokens=small_migm.num_tokens)).eval()
    a = generate(small_migm, ReuseSource(small_migm, plan), cond, 12, seed=2)
    b = generate(small_migm, ShortcutSource(small_migm, zero, plan), cond, 12, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    assert a.counts == {"base_calls": 4, "shortcut_calls": 0, "reused": 8, "base_flops_fraction": 4 / 12}


def test_reuse_and_shortcut_methods_expand_to_the_same_points():
    from migm.accel.reuse import Reuse
    from migm.accel.shortcut import Shortcut
    knobs = dict(steps=[16, 32], budgets=[4, 8], plan="front_loaded", plan_power=2.0)
    shortcut, reuse = Shortcut(**knobs).points(), Reuse(**knobs).points()
    assert [p.label for p in reuse] == [p.label for p in shortcut] == ["N16/B4", "N16/B8", "N32/B4", "N32/B8"]
    assert {p.name for p in reuse} == {"reuse"}


def test_grid_samples_reuse_with_the_shortcuts_plan_and_temperature(small_migm):
    """The floor must be sampled like the shortcut it is compared with: same refresh plan, same
    temperature on the skipped steps; only what fills those steps differs."""
    from migm.accel.reuse import Reuse
    from migm.accel.shortcut import Shortcut
    cond = torch.arange(6) % 10
    zero = ShortcutNetwork(ShortcutConfig(feature_dim=small_migm.feature_dim, vocab_size=small_migm.vocab_size,
                                          num_tokens=small_migm.num_tokens)).eval()

    def run(method, net, temp):
        point = method(steps=[12], budgets=[4], plan="front_loaded", plan_power=2.0, temperature=temp).points()[0]
        return generate(small_migm, point.source(small_migm, net), cond, 12, seed=2)

    reuse = run(Reuse, None, 1.5)
    assert torch.equal(reuse.tokens, run(Shortcut, zero, 1.5).tokens)
    assert not torch.equal(reuse.tokens, run(Reuse, None, 1.0).tokens)
