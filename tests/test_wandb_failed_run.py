"""A fit that fails before it logged anything leaves no W&B run, and wandb is not let print the
sync command of the run that is deleted (the command-line program, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from migm.cli import REPO_ROOT


def test_a_failed_empty_fit_leaves_no_run_and_no_sync_command(tmp_path):
    cfg = yaml.safe_load((REPO_ROOT / "configs/tiny.yaml").read_text())
    cfg["data"]["init_args"]["dirs"] = [str(tmp_path / "nothing")]
    cfg["run"] = {"name": "broken", "root": str(tmp_path / "run")}
    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][:1]
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    env = {**{k: v for k, v in os.environ.items() if k != "MIGM_DEBUG"}, "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "migm", "fit", "--config", str(tmp_path / "fit.yaml")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nothing" in errors[0], result.stderr[-2000:]
    assert "Run data is saved locally" in result.stderr        # a W&B run was started ...
    assert "wandb sync" not in result.stderr + result.stdout   # ... and deleted without its sync line
    assert not list((tmp_path / "run").rglob("offline-run-*")), "a failed fit left a W&B run"
