import torch

from migm.accel.refresh import RefreshPlan
from migm.accel.reuse import ReuseSource
from migm.accel.shortcut import ShortcutSource
from migm.evaluation.grid import GridConfig
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
    assert a.counts == {"base_calls": 4, "shortcut_calls": 0, "reused": 8}


def test_grid_adds_reuse_at_every_shortcut_point_only_when_asked():
    config = GridConfig(vanilla_steps=[8], shortcut_steps=[8, 16], budgets=[4, 8], reference_steps=8)
    assert [p.label for p in config.points() if p.method == "reuse"] == []
    config.reuse = True
    shortcut = [(p.steps, p.budget) for p in config.points() if p.method == "shortcut"]
    reuse = [(p.steps, p.budget) for p in config.points() if p.method == "reuse"]
    assert reuse == shortcut == [(8, 4), (16, 4), (16, 8)]


def test_grid_samples_reuse_with_the_shortcuts_plan_and_temperature(small_migm):
    """The floor must be sampled like the shortcut it is compared with: same refresh plan, same
    temperature on the skipped steps; only what fills those steps differs."""
    from migm.evaluation.grid import GridPoint, make_source
    cond = torch.arange(6) % 10
    zero = ShortcutNetwork(ShortcutConfig(feature_dim=small_migm.feature_dim, vocab_size=small_migm.vocab_size,
                                          num_tokens=small_migm.num_tokens)).eval()
    run = lambda method, net, temp: generate(small_migm, make_source(small_migm, GridPoint(method, 12, 4), net,
                                                                     2.0, temp), cond, 12, seed=2)
    reuse = run("reuse", None, 1.5)
    assert torch.equal(reuse.tokens, run("shortcut", zero, 1.5).tokens)
    assert not torch.equal(reuse.tokens, run("reuse", None, 1.0).tokens)
