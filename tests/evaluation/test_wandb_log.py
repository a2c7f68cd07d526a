"""What an evaluation puts in a W&B run, read back from the offline run with wandb's reader."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from wandb_runs import offline_runs

from migm.evaluation.report import log_report, write_report
from migm.evaluation.wandb_log import frontier, metric_name, pareto_chart


def _rows(quality: str = "fid_classifier") -> list[dict]:
    def row(method, steps, budget, speedup, q, **extra):
        label = f"N{steps}" if method == "vanilla" else f"N{steps}/B{budget}"
        return {"method": method, "label": label, "steps": steps, "budget": budget, quality: q,
                "latency_ms_per_image": 10.0 / speedup, "speedup": speedup, "speedup_min": speedup * 0.9,
                "speedup_max": speedup * 1.1, "ideal_speedup": speedup * 1.2, "peak_memory_mib": 100.0,
                "base_calls": budget, "shortcut_calls": steps - budget, "reference_steps": 16, **extra}
    return [row("vanilla", 16, 16, 1.0, 20.0), row("vanilla", 8, 8, 2.0, 30.0),
            row("vanilla", 4, 4, 4.0, 60.0),
            row("shortcut", 16, 4, 3.5, 24.0, step_temperatures={"3": 1.1}),
            row("shortcut", 16, 8, 1.9, 21.0, step_temperatures={"5": 1.0, "6": 1.2}),
            row("reuse", 16, 4, 3.6, 45.0, reused=12)]


def _log(tmp_path, rows, prefix="eval"):
    samples = {f"{r['method']} {r['label']}": torch.rand(10, 1, 28, 28) * 2 - 1 for r in rows}
    files = write_report(rows, samples, tmp_path / "eval")
    logger = WandbLogger(project="migm-test", save_dir=str(tmp_path), offline=True, group="study",
                         job_type="test")
    csv = CSVLogger(str(tmp_path), name="csv")
    captions = {k: [f"class {j % 10}, seed 0 image {j}" for j in range(10)] for k in samples}
    log_report(rows, files, [logger, csv], step=0, prefix=prefix, samples=samples, captions=captions)
    logger.experiment.finish()
    csv.finalize("success")
    (run,) = offline_runs(tmp_path / "wandb")
    return run


def test_a_test_run_logs_one_row_per_point_once_a_chart_and_captioned_samples(tmp_path):
    rows = _rows()
    run = _log(tmp_path, rows)
    tables = {h_key for h in run.history for h_key, v in h.items() if h_key.endswith("._type")
              and v == "table-file"}
    assert tables == {"eval/results._type", "eval/samples._type", "eval/pareto_chart_table._type"}
    # no per-point history keys: the rows are a table
    assert not [k for h in run.history for k in h if k.startswith("eval/vanilla_")]
    results = run.table("eval/results")
    assert results["columns"][:4] == ["method", "label", "steps", "budget"]
    for col in ("fid_classifier", "latency_ms_per_image", "speedup", "speedup_min", "speedup_max",
                "ideal_speedup", "peak_memory_mib", "reused", "step_temperatures"):
        assert col in results["columns"], col
    assert [(r[0], r[1]) for r in results["data"]] == [(r["method"], r["label"]) for r in rows]

    chart = run.config["_wandb.visualize.eval/pareto_chart"]["panel_config"]
    assert chart["panelDefId"] == "wandb/line/v0"
    assert chart["fieldSettings"] == {"x": "speedup vs vanilla N16", "y": "FID (classifier)", "stroke": "method"}
    assert chart["stringSettings"]["title"].startswith("FID (classifier) (lower is better)")
    data = run.table("eval/pareto_chart_table")
    assert data["columns"][:4] == ["method", "label", "speedup vs vanilla N16", "FID (classifier)"]
    series = [r[0] for r in data["data"]]
    assert set(series) == {"vanilla", "shortcut", "reuse", "Pareto frontier"}
    front = [r[1] for r in data["data"] if r[0] == "Pareto frontier"]
    # by speedup; vanilla N8 is beaten by shortcut N16/B4 on both axes
    assert front == ["vanilla N16", "shortcut N16/B8", "shortcut N16/B4", "reuse N16/B4", "vanilla N4"]
    samples = run.table("eval/samples")
    assert samples["columns"][:3] == ["method", "label", "samples"]
    captions = [r[2]["caption"] for r in samples["data"]]
    assert captions[3].startswith("shortcut N16/B4: 10 samples")
    assert all(r[2]["_type"] == "image-file" for r in samples["data"])
    # then the first samples one by one, each saying what it was drawn for
    assert samples["columns"][5:] == [f"sample_{j}" for j in range(8)]
    assert [c["caption"] for c in samples["data"][3][5:]] == [
        f"shortcut N16/B4: class {j}, seed 0 image {j}" for j in range(8)]

    summary = run.summary
    assert summary["eval/shortcut/best_fid_classifier"] == 21.0
    assert summary["eval/shortcut/best_label"] == "N16/B8"
    assert summary["eval/vanilla/fastest_frontier_label"] == "N4"
    assert run.run["run_group"] == "study" and run.run["job_type"] == "test"
    csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "eval/shortcut_N16_B4/fid_classifier" in csv              # CSV keeps scalars


def test_the_chart_names_its_axis_after_the_metric_measured(tmp_path):
    rows = _rows("clip_score")
    assert metric_name("clip_score") == "CLIPScore" and metric_name("image_reward") == "ImageReward"
    chart = pareto_chart(rows, 16)
    assert chart.spec.fields["y"] == "CLIPScore"
    assert "higher is better" in chart.spec.string_fields["title"]
    # higher CLIPScore is better: vanilla N4 (fastest, 60) beats every other point on both axes
    assert [r["label"] for r in frontier(rows, "clip_score", lower_is_better=False)] == ["N4"]


def test_during_fit_the_points_are_curves_as_well(tmp_path):
    run = _log(tmp_path, _rows(), prefix="fit_eval")
    keys = {k for h in run.history for k in h}
    assert "fit_eval/shortcut_N16_B4/fid_classifier" in keys and "fit_eval/results._type" in keys


def test_rows_without_a_quality_column_are_one_clear_error():
    with pytest.raises(ValueError, match="no quality column"):
        pareto_chart([{"method": "vanilla", "label": "N8", "speedup": 1.0}])
