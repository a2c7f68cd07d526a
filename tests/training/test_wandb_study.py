"""A study as W&B holds it: collect, fit and test runs in one group, each with its job type, a
filterable config, the learning rate, and the lineage shards -> checkpoint -> results, all read
back from the offline runs with wandb's own reader."""

from __future__ import annotations

import json

import pytest
import yaml
from wandb_runs import offline_runs

from migm.cli import REPO_ROOT, main


def _collect(root, group: str):
    cfg = yaml.safe_load((REPO_ROOT / "configs/collect_tiny.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(root / "traj"), batches_per_shard=2)
    cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(root / "traj"))
    cfg["model"]["init_args"].update(steps=6)
    cfg["data"]["init_args"].update(num_trajectories=20, batch_size=10)
    (root / "collect.yaml").write_text(yaml.safe_dump(cfg))
    main(["collect", "--config", str(root / "collect.yaml"), "--run.group", group])
    return root / "traj"


@pytest.mark.slow              # four commands: ~1 min here (test_shortcut.py checks a fit + test fast)
def test_a_study_is_one_group_with_its_lineage(tmp_path, make_config):
    shards = _collect(tmp_path, "study")
    cfg = make_config(tmp_path, shards, wandb=True, max_epochs=1)
    main(["fit", "--config", cfg, "--run.group", "study", "--run.tags", "[demo]"])
    ckpt = tmp_path / "run/checkpoints/best.ckpt"
    main(["test", "--config", cfg, "--run.group", "study", "--ckpt_path", str(ckpt)])

    (collect,) = offline_runs(shards / "wandb")
    fit, test = offline_runs(tmp_path / "run/wandb")
    runs = {"collect": collect, "fit": fit, "test": test}
    for job, run in runs.items():
        assert run.run["run_group"] == "study" and run.run["job_type"] == job, (job, run.run)
    assert fit.run["display_name"] == "tiny-fit" and test.run["display_name"] == "tiny-test"
    assert fit.run["tags"] == ["demo"]

    config = fit.config
    assert config["trainer.precision"] == "32-true" and config["model.lr"] == 0.002
    assert config["evaluation.reference_steps"] == 4
    assert config["evaluation.methods.Shortcut.budgets"] == [2]
    assert config["run.group"] == "study" and "config" not in config
    assert any(k.startswith("lr-") for h in fit.history for k in h), "no learning-rate curve"

    # lineage: collection -> dataset; fit uses it -> model; test uses the model -> results
    (dataset,) = collect.artifacts
    assert dataset["type"] == "dataset"
    meta = json.loads(dataset["metadata"])
    assert meta["trajectories"] == 20 and meta["config_hash"]
    entries = {e["path"]: e for e in dataset["manifest"]["contents"]}
    assert "manifest.json" in entries and entries["shard-000-00000.h5"]["ref"].startswith("file://")
    alias = next(a for a in dataset["aliases"] if a.startswith("manifest-"))
    dataset_ref = f"{dataset['name']}:{alias}"
    assert fit.config["lineage.inputs"] == [dataset_ref]
    (model,) = fit.artifacts
    assert model["type"] == "model" and json.loads(model["metadata"])["inputs"] == [dataset_ref]
    assert {e["path"] for e in model["manifest"]["contents"]} == {"best.ckpt", "last.ckpt"}
    model_ref = f"{model['name']}:{next(a for a in model['aliases'] if a != 'latest')}"
    assert test.config["lineage.inputs"] == [model_ref]
    (results,) = test.artifacts
    assert results["type"] == "results" and json.loads(results["metadata"])["inputs"] == [model_ref]
    assert {"results.jsonl", "results.table.json", "pareto.png"} <= {e["path"] for e in results["manifest"]["contents"]}
    edges = {(i, f"{a['name']}") for run in runs.values() for a in run.artifacts
             for i in json.loads(a.get("metadata") or "{}").get("inputs", [])}
    assert edges == {(dataset_ref, model["name"]), (model_ref, results["name"])}

    # a requeued fit resumes from last.ckpt and continues the same W&B run
    record = json.loads((tmp_path / "run/checkpoints/wandb_run.json").read_text())
    assert record["id"] == fit.run["run_id"] and record["model"] == model_ref
    main(["fit", "--config", cfg, "--run.group", "study", "--trainer.max_epochs", "2",
          "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt")])
    resumed = offline_runs(tmp_path / "run/wandb")[-1]
    assert resumed.run["run_id"] == fit.run["run_id"] and resumed.run["job_type"] == "fit"
