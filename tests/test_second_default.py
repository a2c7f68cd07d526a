"""The second embedded default (L = 196) ships as its own asset set and runs through its config."""

import json
from pathlib import Path

import yaml

from migm.cli import main
from migm.models.tiny import TinyMIGM

REPO = Path(__file__).resolve().parents[1]


def test_its_assets_are_a_196_token_migm():
    model = TinyMIGM.from_assets(base="base196.pt", tokenizer="tokenizer196.pt")
    assert model.num_tokens == 196 and model.feature_dim == 128


def test_test_runs_the_shipped_shortcut196_through_configs_tiny196(tmp_path):
    """`python -m migm test --config configs/tiny196.yaml` with only sizes and paths overridden:
    vanilla, the shipped shortcut and the adaptive refresh on 196-token grids, scored."""
    cfg = yaml.safe_load((REPO / "configs/tiny196.yaml").read_text())
    cfg["trainer"]["logger"] = False
    cfg["run"] = {"root": str(tmp_path)}
    cfg["metrics"]["reference_samples"] = 200
    cfg["evaluation"].update(reference_steps=4, latency_batch=4, latency_repeats=1, methods=[
        {"class_path": "migm.accel.method.Vanilla", "init_args": {"steps": [4]}},
        {"class_path": "migm.accel.shortcut.Shortcut", "init_args": {"steps": [4], "budgets": [2]}},
        {"class_path": "migm.accel.adaptive.AdaptiveShortcut",
         "init_args": {"steps": [4], "budgets": [2], "threshold": [0.3]}}])
    cfg["data"]["init_args"].update(test_samples=20, test_batch_size=10)
    path = tmp_path / "tiny196.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["test", "--config", str(path)])
    rows = [json.loads(line) for line in (tmp_path / "eval/results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["N4", "N4/B2", "N4/B2 d0.3"]
    assert all(r["num_samples"] == 20 and r["fid_classifier"] > 0 for r in rows)
    assert [r["base_calls"] for r in rows] == [4, 2, 2]
