import pytest
import torch

from migm.accel.calibration import TEMPERATURES, CalibrationProbe, fit_step_temperatures, kl_by_temperature
from migm.accel.method import Vanilla
from migm.accel.refresh import RefreshPlan
from migm.accel.reuse import Reuse, ReuseSource
from migm.evaluation.grid import EvaluationGrid, GridConfig
from migm.evaluation.quality import QualityMetrics
from migm.sampling.loop import generate
from migm.sampling.sampler import SamplerConfig

RAMP = SamplerConfig(temperature=1.1, choice_temperature=3.0, cfg_weight=2.0, cfg_schedule="linear")


def test_kl_curve_is_the_direct_kl_and_its_minimum_is_the_logits_scale():
    torch.manual_seed(0)
    target = 3 * torch.randn(5, 7, 32)
    curve = kl_by_temperature(target, 2 * target)      # approx = target sharpened by 2: tau* = 2
    assert TEMPERATURES[int(curve.argmin())].item() == pytest.approx(2.0)
    assert curve.min().item() == pytest.approx(0.0, abs=1e-9)
    k = 10                                             # any tau: the textbook sum p (log p - log q)
    p = torch.softmax(target.double(), -1)
    q = torch.softmax(2 * target.double() / TEMPERATURES[k], -1)
    assert curve[k].item() == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-9)
    assert TEMPERATURES.min().item() == pytest.approx(0.5) and TEMPERATURES.max().item() == pytest.approx(4.0)


def test_the_probe_only_reads_and_scores_every_skipped_step(small_migm):
    cond, plan = torch.arange(6) % 10, RefreshPlan.uniform(12, 4)
    plain = generate(small_migm, ReuseSource(small_migm, plan, 1.3), cond, 12, sampler=RAMP, seed=4)
    probe = CalibrationProbe(ReuseSource(small_migm, plan, 1.3), small_migm, RAMP)
    probed = generate(small_migm, probe, cond, 12, sampler=RAMP, seed=4)
    assert torch.equal(plain.tokens, probed.tokens) and plain.counts == probed.counts
    assert sorted(probe.kl) == sorted(set(range(1, 13)) - plan.base_steps)
    assert all(curve.shape == TEMPERATURES.shape and (curve >= -1e-9).all() for curve in probe.kl.values())


def test_the_probes_curve_at_one_step_equals_a_computation_by_hand(small_migm):
    """Step 3 of N = 8 (base at 1, 5): the grid x_2, the reused f_2, the base's exact f_3; the
    guided logits by the reference formula (1 + w_i) cond - w_i uncond with w_i = w (i-1)/(N-1),
    divided by the sampler's temperature, at the positions still masked."""
    cond, plan, steps = torch.arange(4) % 10, RefreshPlan.uniform(8, 2), 8
    probe = CalibrationProbe(ReuseSource(small_migm, plan), small_migm, RAMP)
    seen = {}

    class Spy:
        def on_step(self, ctx, features, tokens, revealed):
            if ctx.step == 3:
                seen.update(x=ctx.tokens, c=ctx.cond, f=features)

    generate(small_migm, probe, cond, steps, sampler=RAMP, seed=1, observers=[Spy()])
    w = 2.0 * (3 - 1) / (steps - 1)
    masked = seen["x"][0] == small_migm.mask_id                 # every row masks the same count

    def guided(features):
        logits = small_migm.head(features)                      # (2B, L, K), every position
        c, u = logits[:4], logits[4:]
        rows = (1 + w) * c - w * u                              # (B, L, K)
        at = (seen["x"][:4] == small_migm.mask_id)
        return rows[at].double() / 1.1                          # (B*M, K)

    assert masked.sum() < 49
    p = torch.log_softmax(guided(small_migm.features(seen["x"], seen["c"])), -1)
    for k in (0, 17, 48):
        q = torch.log_softmax(guided(seen["f"]) / TEMPERATURES[k], -1)
        assert probe.kl[3][k].item() == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-5)


def test_fitted_temperatures_replace_the_methods_at_their_steps(small_migm, applied_temperatures):
    plan = RefreshPlan.uniform(8, 2)                            # base at 1 and 5
    source = ReuseSource(small_migm, plan, 1.5)
    source.step_temperatures = {3: 2.0, 7: 0.75}
    generate(small_migm, source, torch.arange(3) % 10, 8, seed=0)
    assert applied_temperatures == [1.0, 1.5, 2.0, 1.5, 1.0, 1.5, 0.75, 1.5]


def test_the_grid_fits_on_calibration_seeds_once_and_reports_the_temperatures(small_migm):
    with pytest.raises(ValueError, match="Reuse.calibrate"):
        Reuse(steps=[8], budgets=[2], calibrate=-1)
    config = GridConfig(methods=[Vanilla(steps=[8]), Reuse(steps=[8], budgets=[2], temperature=1.2, calibrate=6)],
                        reference_steps=8, sampler=RAMP, latency_batch=4, latency_repeats=1,
                        calibration_seed=777)
    grid = EvaluationGrid(small_migm, None, QualityMetrics(), config)
    reuse = grid.points[1]
    grid.update(torch.arange(4) % 10, seed=0)
    direct = fit_step_temperatures(small_migm, ReuseSource(small_migm, RefreshPlan.uniform(8, 2), 1.2),
                                   torch.arange(6) % 10, 8, schedule="arccos", sampler=RAMP, seed=777,
                                   batch_size=4)
    assert grid.fitted[reuse] == direct and sorted(direct) == [2, 3, 4, 6, 7, 8]
    assert all(0.5 <= t <= 4.0 for t in direct.values())
    fitted = dict(grid.fitted)
    grid.update(torch.arange(4) % 10, seed=4)                   # fitted once, not per batch
    assert grid.fitted == fitted
    rows = {r["method"]: r for r in grid.compute()}
    assert rows["reuse"]["step_temperatures"] == {str(k): v for k, v in direct.items()}
    assert rows["vanilla"]["step_temperatures"] is None
    grid.reset()
    assert grid.fitted == {}
