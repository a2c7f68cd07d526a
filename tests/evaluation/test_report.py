import json
import random

import pytest
import torch

from migm.evaluation.report import format_table, pareto_front, write_report


def _row(method, steps, budget, latency, fid):
    label = f"N{steps}" if method == "vanilla" else f"N{steps}/B{budget}"
    return {"method": method, "label": label, "steps": steps, "budget": budget, "fid_classifier": fid,
            "class_accuracy": 0.9, "latency_ms_per_image": latency, "speedup": 1.0,
            "ideal_speedup": 1.0, "base_calls": budget, "shortcut_calls": steps - budget}


def test_pareto_front_matches_brute_force_dominance():
    rng = random.Random(0)
    rows = [_row("vanilla", 8, 8, rng.uniform(1, 10), rng.uniform(50, 150)) for _ in range(40)]
    front = set(pareto_front(rows, "latency_ms_per_image", "fid_classifier"))
    for i, r in enumerate(rows):
        dominated = any(o["latency_ms_per_image"] < r["latency_ms_per_image"]
                        and o["fid_classifier"] < r["fid_classifier"] for o in rows)
        assert (i in front) == (not dominated)


def test_report_writes_results_plot_and_labelled_samples(tmp_path):
    rows = [_row("vanilla", 4, 4, 40.0, 120.0), _row("vanilla", 16, 16, 150.0, 105.0),
            _row("shortcut", 16, 4, 50.0, 108.0)]
    samples = {f"{r['method']} {r['label']}": torch.rand(10, 1, 28, 28) * 2 - 1 for r in rows}
    files = write_report(rows, samples, tmp_path, extra_rows=[{"method": "reconstruction"}])
    lines = [json.loads(x) for x in files["results"].read_text().splitlines()]
    assert [x["method"] for x in lines] == ["vanilla", "vanilla", "shortcut", "reconstruction"]
    assert files["pareto"].read_bytes()[:4] == b"\x89PNG" and files["samples"].read_bytes()[:4] == b"\x89PNG"
    assert "N16/B4" in format_table(rows)


def test_table_shows_clipscore_only_when_measured():
    rows = [_row("vanilla", 8, 8, 70.0, 100.0), _row("shortcut", 16, 6, 65.0, 99.0)]
    assert "CLIPScore" not in format_table(rows)
    rows[0]["clip_score"], rows[1]["clip_score"] = 27.5, 26.25
    table = format_table(rows).splitlines()
    assert "CLIPScore" in table[0] and "27.50" in table[1] and "26.25" in table[2]


def test_wandb_gets_rows_whose_nested_values_differ_from_row_to_row(tmp_path):
    """Calibrated points report {step: temperature} with other steps per point; W&B's table must
    take them (it refused a dict column whose keys differ, after the whole evaluation had run)."""
    from lightning.pytorch.loggers import WandbLogger

    from migm.evaluation.report import log_report
    rows = [_row("vanilla", 8, 8, 70.0, 100.0), _row("reuse", 16, 4, 30.0, 99.0), _row("reuse", 16, 8, 40.0, 98.0)]
    rows[0]["step_temperatures"], rows[1]["step_temperatures"] = None, {"3": 1.0, "4": 1.04}
    rows[2]["step_temperatures"] = {"6": 1.0}
    samples = {f"{r['method']} {r['label']}": torch.rand(10, 1, 28, 28) * 2 - 1 for r in rows}
    files = write_report(rows, samples, tmp_path)
    logger = WandbLogger(project="migm-test", save_dir=str(tmp_path), offline=True)
    log_report(rows, files, [logger], step=0)
    logger.experiment.finish()
    assert list(tmp_path.rglob("offline-run-*"))


def test_a_collapsed_row_is_drawn_off_the_chart_not_flattening_the_rest():
    from migm.evaluation.report import off_chart_cap
    study = [95.5, 66.8, 64.4, 60.7, 73.2, 210.2, 212.9, 72.7]       # ReCAP at its reference settings
    assert off_chart_cap(study) == pytest.approx(1.2 * 95.5)
    assert off_chart_cap([95.5, 66.8, 64.4, 60.7]) is None
    assert off_chart_cap([]) is None
