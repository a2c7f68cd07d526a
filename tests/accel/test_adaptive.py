"""Adaptive refresh (accel/adaptive.py): exactly B base calls per sample, placed by the drift."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from migm.accel.adaptive import AdaptiveShortcut, AdaptiveShortcutSource
from migm.accel.refresh import RefreshPlan
from migm.accel.shortcut import ShortcutSource
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig
from migm.shortcut.network import time_input

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from test_layers import randomise  # noqa: E402
from test_shortcut_source import _shortcut  # noqa: E402  (a non-trivial random shortcut)
sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import record_steps  # noqa: E402

GUIDED = SamplerConfig(cfg_weight=1.5)            # two CFG branches: rows [cond; uncond]
N, B = 8, 3


@pytest.fixture
def small_migm(small_migm):
    """Weights drawn at 0.3: at their 0.02 init the features barely see the tokens, so every
    sample would drift alike and no threshold could split them."""
    model = copy.deepcopy(small_migm)
    randomise(model.transformer, 0)
    return model


@pytest.fixture
def shortcut(small_migm):
    return _shortcut(small_migm)


class RowCounter:
    """The base as the source sees it, counting the rows of every features() call."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def features(self, tokens, cond):
        self.rows.append(len(tokens))
        return self.model.features(tokens, cond)


class Decisions:
    """Re-derives each step's refresh decision from the context alone (plain torch, no source
    code), and records what the source decided."""

    def __init__(self, source, shortcut, threshold):
        self.source, self.shortcut, self.threshold = source, shortcut, threshold
        self.outputs = record_steps(source)
        self.expected, self.got, self.temperatures = [], [], []
        self.drift = self.left = None

    def on_step(self, ctx, features, new_tokens, revealed):
        n = len(new_tokens)
        if ctx.step == 1:
            self.drift, self.left = torch.zeros(n), torch.full((n,), B - 1)
            expected = torch.ones(n, dtype=torch.bool)
        else:
            rows = len(ctx.tokens)
            time = time_input(self.shortcut, torch.full((rows,), ctx.t), torch.full((rows,), ctx.mask_ratio))
            pred = self.shortcut(ctx.prev_features, ctx.tokens, ctx.revealed, time)
            masked = (ctx.tokens == self.source.model.mask_id).unsqueeze(-1)
            delta = torch.linalg.vector_norm((pred - ctx.prev_features) * masked, dim=(1, 2))
            size = torch.linalg.vector_norm(ctx.prev_features * masked, dim=(1, 2))
            self.drift += (delta / size).view(2, n).mean(0)
            expected = (self.left > 0) & ((self.drift >= self.threshold) | (self.left >= N - ctx.step + 1))
            self.left -= expected.long()
            self.drift[expected] = 0
        self.expected.append(expected)
        self.got.append(self.outputs[-1].full.clone())


class Drifts:
    def __init__(self, source):
        self.source, self.seen = source, []

    def on_step(self, *step):
        self.seen.append(self.source.drift.clone())


@pytest.mark.parametrize("threshold", [0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1e9])
def test_every_sample_spends_exactly_b_calls_where_its_drift_says(small_migm, shortcut, threshold,
                                                                  applied_temperatures):
    counter = RowCounter(small_migm)
    source = AdaptiveShortcutSource(counter, shortcut, N, B, threshold, temperature=1.3)
    seen = Decisions(source, shortcut, threshold)
    result = generate(small_migm, source, torch.arange(6) % 10, N, sampler=GUIDED, seed=2, observers=[seen])
    assert sum(counter.rows) == 2 * 6 * B                                  # B calls x 6 samples x 2 branches
    assert result.counts == {"base_calls": B, "shortcut_calls": N - 1, "base_flops_fraction": B / N}
    assert torch.stack(seen.got).sum(0).tolist() == [B] * 6
    assert all(torch.equal(g, e) for g, e in zip(seen.got, seen.expected))
    for refreshed, temps in zip(seen.got, applied_temperatures):
        assert torch.equal(temps.flatten(), torch.where(refreshed, 1.0, 1.3))


def test_a_threshold_inside_the_drifts_splits_the_samples(small_migm, shortcut):
    """Not a plan in disguise: with the threshold at the median of the samples' drifts at one
    step, samples of one batch refresh at different steps, each as its own drift says."""
    cond = torch.arange(6) % 10
    late = AdaptiveShortcutSource(small_migm, shortcut, N, B, 1e9)       # refreshes only when forced
    drifts = Drifts(late)
    generate(small_migm, late, cond, N, sampler=GUIDED, seed=2, observers=[drifts])
    threshold = float(drifts.seen[2].median())                           # the drifts after step 3
    source = AdaptiveShortcutSource(small_migm, shortcut, N, B, threshold)
    seen = Decisions(source, shortcut, threshold)
    generate(small_migm, source, cond, N, sampler=GUIDED, seed=2, observers=[seen])
    assert any(0 < int(r.sum()) < 6 for r in seen.got)
    assert all(torch.equal(g, e) for g, e in zip(seen.got, seen.expected))


@pytest.mark.parametrize("threshold,steps", [(0.0, [1, 2, 3]), (1e9, [1, 7, 8])])
def test_extreme_thresholds_are_the_first_and_last_steps_plans(small_migm, shortcut, threshold, steps):
    cond = torch.arange(5) % 10
    adaptive = generate(small_migm, AdaptiveShortcutSource(small_migm, shortcut, N, B, threshold, 1.2),
                        cond, N, sampler=GUIDED, seed=4)
    planned = generate(small_migm, ShortcutSource(small_migm, shortcut, RefreshPlan.explicit(N, steps), 1.2),
                       cond, N, sampler=GUIDED, seed=4)
    assert torch.equal(adaptive.tokens, planned.tokens)


def test_settings_that_cannot_apply_name_the_field(small_migm):
    with pytest.raises(ValueError, match="AdaptiveShortcut.budgets"):
        AdaptiveShortcut(steps=[8], budgets=[8])
    with pytest.raises(ValueError, match="AdaptiveShortcut.threshold"):
        AdaptiveShortcut(steps=[8], budgets=[3], threshold=[-0.1])
    (point,) = AdaptiveShortcut(steps=[8], budgets=[3], threshold=[0.2]).points()
    assert point.label == "N8/B3 d0.2"
    with pytest.raises(ValueError, match="needs shortcut weights"):
        point.source(small_migm, None)
