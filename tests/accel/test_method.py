"""The method registry: families of settings swept into points, checked when built."""

import pytest
import torch

from migm.accel.method import Vanilla
from migm.accel.reuse import Reuse
from migm.accel.shortcut import Shortcut
from migm.accel.taylorseer import TaylorSeer
from migm.evaluation.grid import GridConfig
from migm.sampling.loop import generate


def test_list_fields_are_swept_in_declaration_order_and_scalars_fixed():
    points = Shortcut(steps=[16, 32], budgets=[4, 8], plan="front_loaded", plan_power=2.0).points()
    assert [p.label for p in points] == ["N16/B4", "N16/B8", "N32/B4", "N32/B8"]
    assert points[1].values == {"steps": 16, "budgets": 8}
    assert points[0].method.describe()["plan_power"] == 2.0 and "budgets" not in points[0].method.describe()


@pytest.mark.parametrize("make,field", [
    (lambda: Shortcut(steps=[4], budgets=[8]), "Shortcut.budgets"),
    (lambda: Reuse(steps=[8], budgets=[4], plan_power=0.5), "Reuse.plan_power"),
    (lambda: Reuse(steps=[8], budgets=[4], temperature=-1), "Reuse.temperature"),
    (lambda: Shortcut(steps=[8], budgets=[4], step_scale=3.0), "Shortcut.step_scale"),
    (lambda: Vanilla(steps=[8], temperature=1.1), "Vanilla.temperature"),
    (lambda: Vanilla(steps=[]), "Vanilla.steps"),
])
def test_a_setting_that_cannot_apply_is_an_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_the_grid_refuses_a_reference_it_does_not_run_and_duplicate_points():
    with pytest.raises(ValueError, match="reference_steps: 32 must be one of the Vanilla steps"):
        GridConfig(methods=[Vanilla(steps=[8])], reference_steps=32)
    with pytest.raises(ValueError, match="same point"):
        GridConfig(methods=[Vanilla(steps=[8]), Reuse(steps=[16], budgets=[4]), Reuse(steps=[16], budgets=[4])],
                   reference_steps=8)
    tagged = GridConfig(methods=[Vanilla(steps=[8]), Reuse(steps=[16], budgets=[4]),
                                 Reuse(steps=[16], budgets=[4], temperature=1.2, tag="t1.2")], reference_steps=8)
    assert [p.label for p in tagged.points()] == ["N8", "N16/B4", "N16/B4 t1.2"]


def test_a_caches_temperature_divides_only_the_steps_it_approximates(small_migm, applied_temperatures):
    """TaylorSeer at N=12, interval 4: full steps 1, 2, 6, 10; the others are forecasts. The
    loop divides by the method's temperature exactly where the step's output is not full."""
    seen = applied_temperatures
    method = TaylorSeer(steps=[12], interval=[4], order=[1], temperature=1.5)
    point = method.points()[0]
    source = point.source(small_migm)
    assert source.temperature == 1.5
    cond = torch.arange(4) % 10
    tempered = generate(small_migm, source, cond, 12, seed=3)
    full = [s for s, t in enumerate(seen, 1) if t == 1.0]
    assert full == [1, 2, 6, 10] and all(t == 1.5 for s, t in enumerate(seen, 1) if s not in full)
    plain = generate(small_migm, TaylorSeer(steps=[12], interval=[4], order=[1]).points()[0].source(small_migm),
                     cond, 12, seed=3)
    assert plain.counts == tempered.counts == {"base_calls": 4, "shortcut_calls": 0, "forecasts": 8,
                                               "base_flops_fraction": 4 / 12}
    assert not torch.equal(plain.tokens, tempered.tokens)


def test_a_methods_own_schedule_overrides_the_grids(small_migm):
    from migm.evaluation.grid import EvaluationGrid
    from migm.evaluation.quality import QualityMetrics

    with pytest.raises(ValueError, match="Reuse.schedule"):
        Reuse(steps=[8], budgets=[4], schedule="bogus")
    config = GridConfig(methods=[Vanilla(steps=[8]), Vanilla(steps=[8], schedule="maskgit_reference", tag="ref")],
                        reference_steps=8)
    grid = EvaluationGrid(small_migm, None, QualityMetrics(), config)
    cond = torch.arange(4) % 10
    plain, ref = (grid.generate(p, cond, seed=0) for p in grid.points)
    steps = lambda r: torch.bincount(r.decode_step[0], minlength=9)[1:].tolist()
    from migm.sampling.schedule import reveal_counts
    assert steps(plain) == reveal_counts(49, 8, "arccos") and steps(ref) == reveal_counts(49, 8, "maskgit_reference")


def test_grid_update_reports_each_point_to_its_progress_wrapper(small_migm):
    """A batch of a large grid takes minutes: update() hands its points to a progress wrapper."""
    from migm.evaluation.grid import EvaluationGrid
    from migm.evaluation.quality import QualityMetrics

    config = GridConfig(methods=[Vanilla(steps=[4, 8])], reference_steps=8)
    grid = EvaluationGrid(small_migm, None, QualityMetrics(), config)
    seen = []

    def progress(items):
        for item in items:
            seen.append(item[0].label)
            yield item

    grid.update(torch.arange(4) % 10, seed=0, progress=progress)
    assert seen == [p.label for p in grid.points] and len(grid.calls) == 2


def test_every_counter_a_method_computes_is_in_its_row(small_migm):
    """The grid's rows carry the loop's counts whole: TaylorSeer's forecasts, reuse's reused
    steps, and base_flops_fraction for the planned methods (B/N) as for the caches."""
    from migm.evaluation.grid import EvaluationGrid
    from migm.evaluation.quality import QualityMetrics

    config = GridConfig(methods=[Vanilla(steps=[8]), Reuse(steps=[8], budgets=[2]),
                                 TaylorSeer(steps=[8], interval=[3], order=[1])],
                        reference_steps=8, latency_batch=2, latency_repeats=1, keep_images=0)
    grid = EvaluationGrid(small_migm, None, QualityMetrics(), config)
    grid.update(torch.arange(2) % 10, seed=0)
    rows = {r["method"]: r for r in grid.compute()}
    assert rows["vanilla"]["base_flops_fraction"] == 1.0
    assert rows["reuse"]["reused"] == 6 and rows["reuse"]["base_flops_fraction"] == 2 / 8
    full = TaylorSeer(steps=[8], interval=[3], order=[1]).config(3, 1).full_steps(8)
    assert rows["taylorseer"]["forecasts"] == 8 - len(full)
    assert rows["taylorseer"]["base_flops_fraction"] == len(full) / 8
