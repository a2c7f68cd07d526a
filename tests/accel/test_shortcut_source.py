import pytest
import torch

from migm.accel.refresh import RefreshPlan
from migm.accel.shortcut import ShortcutSource
from migm.sampling.loop import VanillaSource, generate
from migm.shortcut.network import ShortcutConfig, ShortcutNetwork


def _shortcut(model):
    torch.manual_seed(0)
    net = ShortcutNetwork(ShortcutConfig(feature_dim=model.feature_dim, vocab_size=model.vocab_size,
                                         num_tokens=model.num_tokens, heads=2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)               # a non-trivial shortcut
    return net.eval()


@pytest.mark.parametrize("steps,budget", [(12, 4), (8, 3), (6, 1)])
def test_call_counts_are_b_and_n_minus_b(small_migm, steps, budget):
    plan = RefreshPlan.uniform(steps, budget)
    result = generate(small_migm, ShortcutSource(small_migm, _shortcut(small_migm), plan),
                      torch.arange(5) % 10, steps, seed=0)
    assert result.counts == {"base_calls": budget, "shortcut_calls": steps - budget,
                             "base_flops_fraction": budget / steps}
    assert (result.tokens != small_migm.mask_id).all()


def test_budget_n_is_vanilla_and_runs_are_deterministic(small_migm):
    cond = torch.arange(6) % 10
    vanilla = generate(small_migm, VanillaSource(small_migm), cond, 8, seed=3)
    full = generate(small_migm, ShortcutSource(small_migm, _shortcut(small_migm), RefreshPlan.uniform(8, 8)),
                    cond, 8, seed=3)
    assert torch.equal(vanilla.tokens, full.tokens)
    source = ShortcutSource(small_migm, _shortcut(small_migm), RefreshPlan.uniform(8, 3))
    a = generate(small_migm, source, cond, 8, seed=5)
    b = generate(small_migm, source, cond, 8, seed=5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.decode_step, b.decode_step)


def test_shortcut_steps_use_the_shortcut_prediction(small_migm):
    """With B < N the shortcut's features (not the base's) drive the skipped steps: a shortcut
    that is the identity and one that is not produce different samples from one seed."""
    cond = torch.arange(8) % 10
    plan = RefreshPlan.uniform(8, 2)
    identity = ShortcutNetwork(_shortcut(small_migm).config)
    a = generate(small_migm, ShortcutSource(small_migm, identity, plan), cond, 8, seed=1)
    b = generate(small_migm, ShortcutSource(small_migm, _shortcut(small_migm), plan), cond, 8, seed=1)
    assert not torch.equal(a.tokens, b.tokens)


def test_mismatched_plan_or_width_is_refused(small_migm):
    with pytest.raises(ValueError, match="feature_dim"):
        ShortcutSource(small_migm, ShortcutNetwork(), RefreshPlan.uniform(8, 2))
    source = ShortcutSource(small_migm, _shortcut(small_migm), RefreshPlan.uniform(8, 2))
    with pytest.raises(ValueError, match="N=8"):
        generate(small_migm, source, torch.arange(2), 6)


def test_temperature_applies_on_shortcut_steps_only(small_migm, applied_temperatures):
    plan = RefreshPlan.uniform(8, 3)
    source = ShortcutSource(small_migm, _shortcut(small_migm), plan, temperature=1.3)
    generate(small_migm, source, torch.arange(4) % 10, 8, seed=0)
    assert applied_temperatures == [1.0 if plan.uses_base(i) else 1.3 for i in range(1, 9)]
    cold = generate(small_migm, ShortcutSource(small_migm, _shortcut(small_migm), plan), torch.arange(4) % 10, 8, seed=0)
    hot = generate(small_migm, source, torch.arange(4) % 10, 8, seed=0)
    assert not torch.equal(cold.tokens, hot.tokens)
    with pytest.raises(ValueError, match="temperature"):
        ShortcutSource(small_migm, _shortcut(small_migm), plan, temperature=0.0)
