"""Real recorded trajectories of the shipped base model, and small shortcut configs over them."""

from __future__ import annotations

import pytest
import yaml

from migm.cli import REPO_ROOT, main


@pytest.fixture(scope="session")
def record_trajectories(tmp_path_factory):
    """record(steps, trajectories, batch_size) -> a shard directory of the shipped base's
    trajectories (both CFG branches), recorded by `collect` through configs/collect_tiny.yaml."""
    def record(steps: int, trajectories: int, batch_size: int):
        root = tmp_path_factory.mktemp("recorded")
        cfg = yaml.safe_load((REPO_ROOT / "configs/collect_tiny.yaml").read_text())
        cfg["trainer"]["callbacks"][0]["init_args"].update(out_dir=str(root / "traj"), batches_per_shard=2)
        cfg["trainer"].update(enable_progress_bar=False, default_root_dir=str(root / "traj"))
        cfg["model"]["init_args"].update(steps=steps)
        cfg["data"]["init_args"].update(num_trajectories=trajectories, batch_size=batch_size)
        (root / "collect.yaml").write_text(yaml.safe_dump(cfg))
        main(["collect", "--config", str(root / "collect.yaml")])
        return root / "traj"
    return record


@pytest.fixture(scope="session")
def recorded(record_trajectories):
    """30 trajectories of the shipped base at N=6, both CFG branches, recorded by `collect`."""
    return record_trajectories(steps=6, trajectories=30, batch_size=10)


def shortcut_config(tmp_path, shards, *, wandb: bool = False, **trainer) -> str:
    """configs/tiny.yaml shrunk to seconds: few batches, CSV logging (+ W&B offline if asked);
    the run's directory is tmp_path/run (`run.root`: every output path follows from it)."""
    cfg = yaml.safe_load((REPO_ROOT / "configs/tiny.yaml").read_text())
    cfg["run"] = {"name": "tiny", "root": str(tmp_path / "run")}
    t = cfg["trainer"]
    t.update({"enable_progress_bar": False, "log_every_n_steps": 1, "max_epochs": 2, **trainer})
    t["logger"] = [lg for lg in t["logger"] if wandb or "Wandb" not in lg["class_path"]]
    t["callbacks"] = [cb for cb in t["callbacks"] if "EvaluationCallback" not in cb["class_path"]]
    cfg["model"]["init_args"]["warmup_steps"] = 2
    e = cfg["evaluation"]
    shortcut = next(x for x in e["methods"] if x["class_path"].endswith("Shortcut"))
    shortcut["init_args"].update(steps=[4], budgets=[2])
    e.update(methods=[{"class_path": "migm.accel.method.Vanilla", "init_args": {"steps": [2, 4]}},
                      shortcut], reference_steps=4, latency_batch=8, latency_repeats=1, keep_images=10)
    cfg["metrics"]["reference_samples"] = 500
    cfg["data"]["init_args"].update(dirs=[str(shards)], batch_size=32, val_fraction=0.2,
                                    test_samples=40, test_batch_size=20)
    path = tmp_path / "shortcut.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def make_config():
    return shortcut_config
