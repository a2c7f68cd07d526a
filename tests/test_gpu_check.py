"""`make gpu-check` before any GPU: its one-line refusal without CUDA, the commands it will run
(each config parses), and its CPU-sized dry run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from migm.cli import REPO_ROOT, main
from migm.gpu_check import Step, device_tag, main as gpu_check, plan, run, select, write_summary


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "migm.gpu_check", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("gpu-check: no CUDA device") and len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())                      # nothing ran, nothing written


def test_the_plan_runs_the_shipped_configs_on_the_device(tmp_path, capsys):
    steps = plan("cuda", small=False, out=tmp_path, tag=device_tag("NVIDIA H200"), root=REPO_ROOT)
    assert [s.name.split(" (")[0] for s in steps] == ["device tests", "collect", "fit", "test", "speed maskgit",
                                                      "speed dimoo"]
    assert steps[0].argv[-1] == str(REPO_ROOT / "tests" / "test_device.py")
    assert (steps[2].needs, steps[3].needs) == (steps[1].name, steps[2].name)   # shards, checkpoint
    assert not any(s.needs for s in (steps[0], steps[1], *steps[4:]))
    for step in steps[1:4]:                 # collect, fit, test: the configs as they will be read
        argv = step.argv[3:]
        assert "--trainer.accelerator" not in argv          # the configs' own: gpu
        with pytest.raises(SystemExit):
            main([*[a for a in argv if a != "--ckpt_path" and not a.endswith("last.ckpt")], "--print_config"])
        printed = capsys.readouterr().out
        assert "accelerator: gpu" in printed
        if step.argv[3] == "fit":
            assert "precision: bf16-mixed" in printed
    maskgit, dimoo = steps[4].argv, steps[5].argv
    assert maskgit[maskgit.index("--whole") + 1] == "all"
    assert json.loads(dimoo[dimoo.index("--whole") + 1]) == ["vanilla N64", "vanilla N14", "shortcut N64/B14"]
    assert maskgit[-1] == str(tmp_path / "maskgit_nvidia_h200.jsonl")


def test_a_failed_step_skips_only_what_needs_it_and_the_summary_follows_each_step(tmp_path):
    """Real processes: collect fails (exit 3), so fit (which reads its shards) and test (fit's
    checkpoint) are skipped; the device tests before and the speed step after still run. The
    summary on disk is rewritten after each step, so a run killed at its limit says what it did."""
    py = sys.executable
    ok, fail = [py, "-c", "pass"], [py, "-c", "raise SystemExit(3)"]
    steps = [Step("device tests", ok), Step("collect (x)", fail), Step("fit (x)", ok, needs="collect (x)"),
             Step("test (x)", ok, needs="fit (x)"), Step("speed maskgit", ok)]
    path, seen = tmp_path / "check.json", []

    def after():
        write_summary(path, "cpu", True, steps)
        seen.append([s["returncode"] for s in json.loads(path.read_text())["steps"]])

    assert run(steps, log=lambda line: None, after=after) is False
    assert [s.returncode for s in steps] == [0, 3, None, None, 0]
    assert steps[2].skipped == "needs collect (x), which did not pass"
    assert steps[3].skipped == "needs fit (x), which did not pass"
    assert seen == [[0, None, None, None, None], [0, 3, None, None, None], [0, 3, None, None, None],
                    [0, 3, None, None, None], [0, 3, None, None, 0]]
    assert run([Step("a", ok), Step("b", ok, needs="a")], log=lambda line: None) is True


def test_steps_are_picked_by_name_or_first_word_and_an_unknown_one_is_named(tmp_path, capsys):
    steps = plan("cuda", small=False, out=tmp_path, tag="h200", root=REPO_ROOT)
    assert [s.name for s in select(steps, ["speed"])] == ["speed maskgit (full size, random weights)",
                                                          "speed dimoo (full size, random weights)"]
    assert [s.name for s in select(steps, ["device tests", "fit"])] == [
        "device tests", "fit (embedded default, bf16-mixed)"]
    assert select(steps, None) == steps
    assert gpu_check(["--device", "cpu", "--steps", "sped", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu-check --steps: no step 'sped'; the steps: device tests, collect")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_dry_run_passes_on_the_cpu(tmp_path):
    """Every step at test sizes on the CPU (about 2 minutes here)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "migm.gpu_check", "--small", "--device", "cpu",
                           "--root", str(REPO_ROOT), "--out", str(tmp_path / "out")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "check_small_cpu.json").read_text())
    assert summary["ok"] and [s["returncode"] for s in summary["steps"]] == [0] * 6
    assert not any(s["skipped"] for s in summary["steps"])
    for kind in ("maskgit", "dimoo"):
        rows = [json.loads(line) for line in (tmp_path / "out" / f"{kind}_small_cpu.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and rows[1]["composed_over_measured"] > 0
