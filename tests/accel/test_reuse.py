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
