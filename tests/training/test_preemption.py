"""A run a scheduler stops is never reported done: real signals sent to a real `migm` process.

SLURM sends SIGTERM before it kills a job. A stopped `fit` must exit 128 + 15, say in one line
what it saved and how to resume, and leave a checkpoint the resumed run continues from; a
stopped `test` must exit non-zero too (it wrote nothing finished).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from migm.cli import REPO_ROOT

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "migm", *args], cwd=REPO_ROOT, env=CLEAN_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path_glob, root: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if any(root.glob(path_glob)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{path_glob} never appeared under {root}")


def test_sigterm_during_fit_saves_a_checkpoint_says_so_and_exits_143(recorded, tmp_path, make_config):
    cfg_path = make_config(tmp_path, recorded, max_epochs=200)
    proc = start("fit", "--config", cfg_path)
    run = tmp_path / "run"
    wait_for("csv/*/metrics.csv", run, proc)          # training has logged a step
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    last = run / "checkpoints" / "last.ckpt"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: stopped by SIGTERM: saved {last}; resume with: migm fit --config "
                     f"{cfg_path} --ckpt_path {last}"], err[-2000:]
    import torch
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] > 0 and state["epoch"] < 200
    # the resume continues from it: a short run from the saved step finishes with exit 0
    cfg = yaml.safe_load(Path(cfg_path).read_text())
    cfg["trainer"]["max_steps"] = state["global_step"] + 2
    resumed = tmp_path / "resume.yaml"
    resumed.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "migm", "fit", "--config", str(resumed), "--ckpt_path", str(last)],
                          cwd=REPO_ROOT, env=CLEAN_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == state["global_step"] + 2


def test_sigterm_during_test_exits_nonzero_saying_nothing_was_finished(recorded, tmp_path, make_config):
    cfg = yaml.safe_load(Path(make_config(tmp_path, recorded)).read_text())
    cfg["data"]["init_args"].update(test_samples=4000, test_batch_size=20)      # minutes of work
    path = tmp_path / "long_test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = start("test", "--config", str(path))
    # the out_dir's lock is taken in the module's setup, after Lightning installed its handler
    wait_for(".lock", tmp_path / "run" / "eval", proc)
    time.sleep(2.0)                                         # inside the test loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert "error: stopped by SIGTERM: nothing was finished or saved" in err
    assert not (tmp_path / "run" / "eval" / "results.jsonl").exists()


def test_sigterm_during_collect_keeps_its_shards_exits_143_and_the_rerun_completes(tmp_path):
    """Lightning's predict loop ignores the SIGTERM it catches: collect must stop by itself."""
    shards = tmp_path / "shards"
    args = ["collect", "--config", str(REPO_ROOT / "configs/collect_tiny.yaml"), "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "root"), "--trainer.callbacks.init_args.out_dir",
            str(shards), "--trainer.callbacks.init_args.batches_per_shard", "1",
            "--model.init_args.steps", "6", "--data.init_args.num_trajectories", "100",
            "--data.init_args.batch_size", "5"]
    proc = start(*args)
    wait_for("shard-*.h5", shards, proc)                 # the collection is writing
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: stopped by SIGTERM: the finished shards are kept in {shards}; run the "
                     "same command again to resume from them"], err[-2000:]
    kept = sorted(shards.glob("shard-*.h5"))
    assert 0 < len(kept) < 20 and not (shards / "manifest.json").exists()
    # the same command resumes: the kept shards are not rewritten, the rest are
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    done = subprocess.run([sys.executable, "-m", "migm", *args], cwd=REPO_ROOT, env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in kept)
    assert len(list(shards.glob("shard-*.h5"))) == 20 and (shards / "manifest.json").exists()
